// Test infrastructure only, never part of the product: VM Operator v1.10.0's
// own admission code (the VirtualMachine and VirtualMachineGroup mutating and
// validating webhooks, and the conversion webhook), its VirtualMachineGroup
// controller and, with Bring Your Own Key on, its StorageClass controller
// (which records each storage policy as a StoragePolicy object), in one
// process, built through VM Operator's own manager.
//
// With --provider=fake (the default) VM Operator's fake VM provider answers
// for vCenter: nothing is deployed. With --provider=vsphere the controllers
// get VM Operator's real vSphere provider, and its VirtualMachine,
// VirtualMachineClass, VirtualMachineSetResourcePolicy and Zone controllers
// and vm-watcher service run too. The provider reads the provider ConfigMap
// and credentials Secret in vmware-system-vmop and talks to the vCenter they
// name (in the e2e: govmomi's vCenter simulator, cmd/vcsim-e2e). Nothing of
// VM Operator is rewritten here; this file only chooses what to run and where.
package main

import (
	"flag"
	"fmt"
	"os"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmgr "sigs.k8s.io/controller-runtime/pkg/manager"

	zonecontroller "github.com/vmware-tanzu/vm-operator/controllers/infra/zone"
	storageclasscontroller "github.com/vmware-tanzu/vm-operator/controllers/storage/storageclass"
	vmcontrollers "github.com/vmware-tanzu/vm-operator/controllers/virtualmachine"
	classcontroller "github.com/vmware-tanzu/vm-operator/controllers/virtualmachineclass"
	groupcontroller "github.com/vmware-tanzu/vm-operator/controllers/virtualmachinegroup"
	policycontroller "github.com/vmware-tanzu/vm-operator/controllers/virtualmachinesetresourcepolicy"
	pkgcfg "github.com/vmware-tanzu/vm-operator/pkg/config"
	pkgctx "github.com/vmware-tanzu/vm-operator/pkg/context"
	pkgmgr "github.com/vmware-tanzu/vm-operator/pkg/manager"
	pkgmgrinit "github.com/vmware-tanzu/vm-operator/pkg/manager/init"
	providerfake "github.com/vmware-tanzu/vm-operator/pkg/providers/fake"
	"github.com/vmware-tanzu/vm-operator/pkg/util/kube/cource"
	"github.com/vmware-tanzu/vm-operator/pkg/util/ovfcache"
	"github.com/vmware-tanzu/vm-operator/pkg/util/vsphere/watcher"
	vmwatcher "github.com/vmware-tanzu/vm-operator/services/vm-watcher"
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
	provider := flag.String("provider", "fake",
		"the VM provider: fake (VM Operator's fake provider, nothing deployed) or vsphere (its real vSphere "+
			"provider and VirtualMachine controllers, against the vCenter the provider ConfigMap names)")
	groupController := flag.Bool("group-controller", true, "run the VirtualMachineGroup controller (with the chosen provider)")
	immutableClasses := flag.Bool("immutable-classes", true,
		"VMs name a VirtualMachineClassInstance in spec.class (the ImmutableClasses capability)")
	networkProvider := flag.String("network-provider", string(pkgcfg.NetworkProviderTypeVPC),
		"the Supervisor's network provider: NSXT_VPC, NSXT, VSPHERE_NETWORK or NAMED")
	byok := flag.Bool("byok", false,
		"turn on Bring Your Own Key: spec.crypto is allowed and needs an encryption storage class, and the "+
			"StorageClass controller records each policy in a StoragePolicy (whose status.encrypted vCenter sets)")
	workloadDomainIsolation := flag.Bool("workload-domain-isolation", false,
		"the WorkloadDomainIsolation capability: a namespace's folder and resource pools come from its Zone "+
			"objects (as on 9.x Supervisors) rather than from the AvailabilityZones")
	// On a Supervisor this is the Deployment's PRIVILEGED_USERS variable; the
	// negative control in test_vcenter.py sets it to Velero's ServiceAccount.
	privilegedUsers := flag.String("privileged-users", os.Getenv("PRIVILEGED_USERS"),
		"comma-separated users VM Operator's webhooks treat as privileged (PRIVILEGED_USERS)")
	syncPeriod := flag.Duration("sync-period", pkgmgr.DefaultSyncPeriod,
		"how often every object is reconciled again without an event (--sync-period; 30m on a Supervisor)")
	maxReconciles := flag.Int("max-concurrent-reconciles", pkgmgr.DefaultMaxConcurrentReconciles,
		"reconciles per controller (MAX_CONCURRENT_RECONCILES; VM Operator's own Deployment sets 20)")
	logOpts := zap.Options{}
	logOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&logOpts)))

	vsphere := false
	switch *provider {
	case "fake":
	case "vsphere":
		vsphere = true
	default:
		fmt.Fprintf(os.Stderr, "vmop-host: unknown --provider %q (fake or vsphere)\n", *provider)
		os.Exit(2)
	}

	cfg := pkgcfg.Default()
	cfg.Features.VMGroups = true
	cfg.Features.ImmutableClasses = *immutableClasses
	cfg.Features.BringYourOwnEncryptionKey = *byok
	cfg.Features.WorkloadDomainIsolation = *workloadDomainIsolation
	cfg.PrivilegedUsers = *privilegedUsers
	// As MAX_CONCURRENT_RECONCILES sets both: the controllers' workers, and
	// the share of them (MaxCreateVMsOnProvider, 80%) that may deploy at once.
	cfg.MaxConcurrentReconciles = *maxReconciles
	// As POD_NAMESPACE sets it on a Supervisor: where VM Operator keeps its
	// StoragePolicy objects, and where the vSphere provider reads its
	// ConfigMap and credentials Secret.
	cfg.PodNamespace = podNamespace
	cfg.NetworkProviderType = pkgcfg.NetworkProviderType(*networkProvider)
	ctx := pkgcfg.JoinContext(ctrl.SetupSignalHandler(), pkgcfg.WithConfig(cfg))
	// VM Operator's main.go puts these into the manager's context; its
	// VirtualMachine controller and vSphere provider expect them there.
	ctx = cource.WithContext(ctx)
	ctx = watcher.WithContext(ctx)
	ctx = ovfcache.WithContext(ctx)

	mgr, err := pkgmgr.New(ctx, pkgmgr.Options{
		WebhookServiceContainerPort:  *port,
		WebhookSecretVolumeMountPath: *certDir,
		MetricsAddr:                  "0",
		HealthProbeBindAddress:       *healthAddr,
		PodNamespace:                 podNamespace,
		PodName:                      "vmware-system-vmop-controller-manager",
		PodServiceAccountName:        "vmware-system-vmop",
		MaxConcurrentReconciles:      *maxReconciles,
		SyncPeriod:                   *syncPeriod,
		InitializeProviders: func(ctx *pkgctx.ControllerManagerContext, mgr ctrlmgr.Manager) error {
			if vsphere {
				// VM Operator's own choice of provider (pkg/manager/init).
				return pkgmgrinit.InitializeProviders(ctx, mgr)
			}
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
			if vsphere {
				// The VirtualMachine, storage policy usage and volume
				// controllers, as controllers.AddToManager adds them; the
				// VirtualMachineClass controller, which makes each class's
				// active instance (named by a hash of its configSpec) that
				// VMs name in spec.class; and the
				// VirtualMachineSetResourcePolicy controller, which makes a
				// policy's child resource pools and folder in vCenter.
				if err := vmcontrollers.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("VirtualMachine controllers: %w", err)
				}
				if err := classcontroller.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("VirtualMachineClass controller: %w", err)
				}
				if err := policycontroller.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("VirtualMachineSetResourcePolicy controller: %w", err)
				}
				// As on a Supervisor (ASYNC_SIGNAL_ENABLED and
				// ASYNC_CREATE_ENABLED, both on by default): VM Operator's
				// vm-watcher service follows the VMs in each Zone's folder in
				// vCenter with a property collector and signals the
				// VirtualMachine controller, which otherwise waits for its
				// next resync after each step of a create that does not
				// requeue. The Zone controller releases a deleted Zone's
				// folder from the watch.
				if err := vmwatcher.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("vm-watcher service: %w", err)
				}
				if err := zonecontroller.AddToManager(ctx, mgr); err != nil {
					return fmt.Errorf("Zone controller: %w", err)
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
