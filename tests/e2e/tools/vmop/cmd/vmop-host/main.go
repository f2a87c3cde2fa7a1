// Test infrastructure only, never part of the product: VM Operator v1.10.0's
// own admission code (the VirtualMachine and VirtualMachineGroup mutating and
// validating webhooks, and the conversion webhook), its VirtualMachineGroup
// controller and, with Bring Your Own Key on, its StorageClass controller
// (which records each storage policy as a StoragePolicy object), with VM
// Operator's fake VM provider, in one
// process, built through VM Operator's own manager. Nothing of VM Operator is
// rewritten here; this file only chooses what to run and where.
package main

import (
	"flag"
	"fmt"
	"os"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmgr "sigs.k8s.io/controller-runtime/pkg/manager"

	storageclasscontroller "github.com/vmware-tanzu/vm-operator/controllers/storage/storageclass"
	groupcontroller "github.com/vmware-tanzu/vm-operator/controllers/virtualmachinegroup"
	pkgcfg "github.com/vmware-tanzu/vm-operator/pkg/config"
	pkgctx "github.com/vmware-tanzu/vm-operator/pkg/context"
	pkgmgr "github.com/vmware-tanzu/vm-operator/pkg/manager"
	providerfake "github.com/vmware-tanzu/vm-operator/pkg/providers/fake"
	"github.com/vmware-tanzu/vm-operator/webhooks/conversion"
	vmwebhooks "github.com/vmware-tanzu/vm-operator/webhooks/virtualmachine"
	groupwebhooks "github.com/vmware-tanzu/vm-operator/webhooks/virtualmachinegroup"
)

// VM Operator's namespace on a Supervisor.
const podNamespace = "vmware-system-vmop"

func main() {
	certDir := flag.String("cert-dir", "", "directory with tls.crt and tls.key for the webhook server")
	port := flag.Int("port", 9878, "webhook server port (127.0.0.1 is not enforced: bind is VM Operator's)")
	healthAddr := flag.String("health-addr", "127.0.0.1:0", "health probe address")
	groupController := flag.Bool("group-controller", true, "run the VirtualMachineGroup controller (fake VM provider)")
	immutableClasses := flag.Bool("immutable-classes", true,
		"VMs name a VirtualMachineClassInstance in spec.class (the ImmutableClasses capability)")
	networkProvider := flag.String("network-provider", string(pkgcfg.NetworkProviderTypeVPC),
		"the Supervisor's network provider: NSXT_VPC, NSXT, VSPHERE_NETWORK or NAMED")
	byok := flag.Bool("byok", false,
		"turn on Bring Your Own Key: spec.crypto is allowed and needs an encryption storage class, and the "+
			"StorageClass controller records each policy in a StoragePolicy (whose status.encrypted vCenter sets)")
	flag.Parse()
	ctrl.SetLogger(zap.New())

	cfg := pkgcfg.Default()
	cfg.Features.VMGroups = true
	cfg.Features.ImmutableClasses = *immutableClasses
	cfg.Features.BringYourOwnEncryptionKey = *byok
	// As POD_NAMESPACE sets it on a Supervisor: where VM Operator keeps its
	// StoragePolicy objects.
	cfg.PodNamespace = podNamespace
	cfg.NetworkProviderType = pkgcfg.NetworkProviderType(*networkProvider)
	ctx := pkgcfg.JoinContext(ctrl.SetupSignalHandler(), pkgcfg.WithConfig(cfg))

	mgr, err := pkgmgr.New(ctx, pkgmgr.Options{
		WebhookServiceContainerPort:  *port,
		WebhookSecretVolumeMountPath: *certDir,
		MetricsAddr:                  "0",
		HealthProbeBindAddress:       *healthAddr,
		PodNamespace:                 podNamespace,
		PodName:                      "vmware-system-vmop-controller-manager",
		PodServiceAccountName:        "vmware-system-vmop",
		InitializeProviders: func(ctx *pkgctx.ControllerManagerContext, _ ctrlmgr.Manager) error {
			ctx.VMProvider = providerfake.NewVMProvider()
			return nil
		},
		AddToManager: func(ctx *pkgctx.ControllerManagerContext, mgr ctrlmgr.Manager) error {
			if err := conversion.AddToManager(ctx, mgr); err != nil {
				return fmt.Errorf("conversion webhooks: %w", err)
			}
			if err := vmwebhooks.AddToManager(ctx, mgr); err != nil {
				return fmt.Errorf("VirtualMachine webhooks: %w", err)
			}
			if err := groupwebhooks.AddToManager(ctx, mgr); err != nil {
				return fmt.Errorf("VirtualMachineGroup webhooks: %w", err)
			}
			if *byok {
				if err := storageclasscontroller.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("StorageClass controller: %w", err)
				}
			}
			if *groupController {
				if err := groupcontroller.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("VirtualMachineGroup controller: %w", err)
				}
			}
			return nil
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmop-host:", err)
		os.Exit(1)
	}
	if err := mgr.Start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "vmop-host:", err)
		os.Exit(1)
	}
}
