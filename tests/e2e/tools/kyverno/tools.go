//go:build tools

// Package tools pins Kyverno's admission controller for the peer benchmark.
package tools

import (
	_ "github.com/kyverno/kyverno/cmd/kyverno"
)
