//go:build tools

// Package tools pins the Velero command the e2e suite builds for
// VELERO_VERSION=1.17.2.
package tools

import (
	_ "github.com/vmware-tanzu/velero/cmd/velero"
)
