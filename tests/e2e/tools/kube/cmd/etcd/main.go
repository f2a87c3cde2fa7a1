// Command etcd is etcd's own server main, built from the etcd module that
// kube-apiserver is tested against, so the e2e suite needs no release binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
