//go:build tools

// Package tools pins kube-router, whose network policy controller enforces
// NetworkPolicy on the one-node cluster (test_cluster.py).
package tools

import (
	_ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
)
