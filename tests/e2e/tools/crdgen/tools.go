//go:build tools

// Package crdgen pins controller-gen and the NSX Operator API types it reads.
package crdgen

import (
	_ "github.com/vmware-tanzu/nsx-operator/pkg/apis/vpc/v1alpha1"
	_ "sigs.k8s.io/controller-tools/cmd/controller-gen"
)
