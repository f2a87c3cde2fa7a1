// Command webhook runs cert-manager's admission webhook server
// (internal/webhook of github.com/cert-manager/cert-manager: validation,
// defaulting and the CertificateRequest checks) with its dynamic serving
// certificate, signed by a CA it keeps in a Secret. It takes the flags
// cert-manager's Helm chart passes its webhook.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/cert-manager/cert-manager/internal/apis/config/shared"
	config "github.com/cert-manager/cert-manager/internal/apis/config/webhook"
	"github.com/cert-manager/cert-manager/internal/webhook"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	fs := flag.NewFlagSet("webhook", flag.ExitOnError)
	klog.InitFlags(fs)
	var dnsNames list
	securePort := fs.Int("secure-port", 6443, "HTTPS port")
	healthzPort := fs.Int("healthz-port", 6080, "/healthz and /livez port")
	secretNamespace := fs.String("dynamic-serving-ca-secret-namespace", "", "namespace of the CA Secret")
	secretName := fs.String("dynamic-serving-ca-secret-name", "", "name of the CA Secret")
	fs.Var(&dnsNames, "dynamic-serving-dns-names", "DNS names of the serving certificate (repeatable)")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig (empty: in-cluster)")
	_ = fs.Parse(os.Args[1:])

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	log := logf.Log.WithName("webhook")
	server, err := webhook.NewCertManagerWebhookServer(log, config.WebhookConfiguration{
		SecurePort: int32(*securePort), HealthzPort: int32(*healthzPort), KubeConfig: *kubeconfig,
		MetricsListenAddress: "0.0.0.0:9402",
		TLSConfig: shared.TLSConfig{Dynamic: shared.DynamicServingConfig{
			SecretNamespace: *secretNamespace, SecretName: *secretName, DNSNames: dnsNames,
			LeafDuration: 7 * 24 * time.Hour, // cert-manager's default
		}},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "webhook:", err)
		os.Exit(1)
	}
	if err := server.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "webhook:", err)
		os.Exit(1)
	}
}
