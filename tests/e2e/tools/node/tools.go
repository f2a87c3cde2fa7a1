//go:build tools

// Package tools pins the Kubernetes node commands the cluster mode builds,
// at the same version as tools/kube's kube-apiserver.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
