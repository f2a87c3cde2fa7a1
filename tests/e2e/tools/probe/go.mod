// Test infrastructure only: the client program the cluster mode's
// NetworkPolicy scenarios run in pods (no dependencies, so it builds in
// seconds and changing it leaves the enforcer's cache key alone). Never part
// of the product.
module github.com/velero-vm-restore-webhook/e2e-tools/probe

go 1.24.0
