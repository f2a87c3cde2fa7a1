// Command controller runs cert-manager's controllers that the chart's
// certManager mode needs (Issuers and ClusterIssuers of the CA and
// self-signed kinds, the Certificate controllers, the CertificateRequest
// approver and signers), each cert-manager's own code from
// github.com/cert-manager/cert-manager/pkg/controller. It takes the flags
// cert-manager's Helm chart passes its controller; leader election is not
// done (one replica) and ACME is not built in.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	controllerpkg "github.com/cert-manager/cert-manager/pkg/controller"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
)

func main() {
	fs := flag.NewFlagSet("controller", flag.ExitOnError)
	klog.InitFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig (empty: in-cluster)")
	clusterResourceNamespace := fs.String("cluster-resource-namespace", "kube-system", "namespace of ClusterIssuers' Secrets")
	healthz := fs.String("healthz-listen-address", "0.0.0.0:9403", "where /livez is served")
	// Passed by cert-manager's chart; not used here.
	fs.String("leader-election-namespace", "", "ignored: one replica, no leader election")
	fs.String("acme-http01-solver-image", "", "ignored: ACME is not built in")
	fs.Int("max-concurrent-challenges", 60, "ignored: ACME is not built in")
	_ = fs.Parse(os.Args[1:])

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	ctx = logf.NewContext(ctx, logf.Log, "controller")

	factory, err := controllerpkg.NewContextFactory(ctx, controllerpkg.ContextOptions{
		Kubeconfig: *kubeconfig, KubernetesAPIQPS: 20, KubernetesAPIBurst: 50,
		IssuerOptions: controllerpkg.IssuerOptions{ClusterResourceNamespace: *clusterResourceNamespace},
		// cert-manager's defaults (internal/apis/config/controller/v1alpha1).
		CertificateOptions: controllerpkg.CertificateOptions{
			CertificateRequestMinimumBackoffDuration: time.Hour,
			CertificateRequestMaximumBackoffDuration: 32 * time.Hour,
		},
	})
	if err != nil {
		fail("building the controller context", err)
	}
	names := make([]string, 0, len(controllerpkg.Known()))
	for name := range controllerpkg.Known() {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		loop, err := controllerpkg.Known()[name](factory)
		if err != nil {
			fail("starting "+name, err)
		}
		klog.InfoS("starting controller", "controller", name)
		go func(name string, loop controllerpkg.Interface) {
			if err := loop.Run(5, ctx); err != nil {
				fail("running "+name, err)
			}
		}(name, loop)
	}
	shared, err := factory.Build()
	if err != nil {
		fail("building the shared context", err)
	}
	shared.KubeSharedInformerFactory.Start(ctx.Done())
	shared.SharedInformerFactory.Start(ctx.Done())
	shared.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())

	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	server := &http.Server{Addr: *healthz, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			fail("serving /livez", err)
		}
	}()
	<-ctx.Done()
	_ = server.Close()
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "controller: %s: %v\n", what, err)
	os.Exit(1)
}
