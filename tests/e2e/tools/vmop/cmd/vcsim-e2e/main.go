// Test infrastructure only, never part of the product: govmomi's vCenter
// simulator (vcsim), the e2e's stand-in for vCenter, seeded as a Supervisor's
// vCenter is before VM Operator deploys anything, and the e2e's window into
// it. VM Operator's vSphere provider (cmd/vmop-host --provider=vsphere) talks
// to it over the same SOAP and REST APIs it uses against a real vCenter.
//
//	vcsim-e2e serve --env FILE --zone NAME... --network NAME... --policy NAME... --item LIB/NAME=OVA...
//	    runs vcsim until SIGTERM; FILE gets its URL, credentials and the MoIDs
//	    and IDs the API server side needs
//	vcsim-e2e namespace --env FILE NAME
//	    what the Supervisor does in vCenter for a new namespace: a folder and,
//	    in each zone's cluster, a resource pool; prints their MoIDs
//	vcsim-e2e inventory --env FILE
//	    prints every VM vcsim holds (MoID, UUIDs, power, boot time, MACs,
//	    networks, pool, folder, disks) and its events (power-ons, reconfigures,
//	    removals), as JSON
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/event"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/pbm"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vapi/library"
	"github.com/vmware/govmomi/vapi/rest"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	pkgutil "github.com/vmware-tanzu/vm-operator/pkg/util"

	// Registering these makes vcsim serve the content library and
	// vCenter REST APIs, storage policies (PBM) and cluster modules, which VM
	// Operator's provider calls.
	_ "github.com/vmware/govmomi/pbm/simulator"
	_ "github.com/vmware/govmomi/vapi/cluster/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

// Env is what serve writes and the other commands (and the e2e harness) read.
type Env struct {
	URL        string `json:"url"`
	Host       string `json:"host"`
	Port       string `json:"port"`
	Username   string `json:"username"`
	Password   string `json:"password"`
	CAFile     string `json:"caFile"`
	Datacenter string `json:"datacenter"`
	Datastore  string `json:"datastore"`
	// The folder the Supervisor keeps its namespaces' folders in.
	NamespacesFolder string `json:"namespacesFolder"`
	// Zone name -> its vSphere cluster and that cluster's root pool.
	Zones map[string]Zone `json:"zones"`
	// Port group name -> MoID; VM Operator's NAMED network provider finds
	// networks by these names.
	Networks map[string]string `json:"networks"`
	// Storage policy name -> PBM profile ID (a StorageClass's storagePolicyID).
	StoragePolicies map[string]string `json:"storagePolicies"`
	// "LIBRARY/ITEM" -> the content library item an image is deployed from.
	Items map[string]Item `json:"items"`
}

type Zone struct {
	Cluster     string `json:"cluster"`
	ClusterName string `json:"clusterName"`
	RootPool    string `json:"rootPool"`
}

type Item struct {
	Library        string `json:"library"`
	LibraryID      string `json:"libraryID"`
	ID             string `json:"id"`
	Name           string `json:"name"`
	Type           string `json:"type"`
	ContentVersion string `json:"contentVersion"`
	Source         string `json:"source"`
	// The name VM Operator gives the VirtualMachineImage of this item.
	VMIName string `json:"vmiName"`
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: vcsim-e2e serve|namespace|inventory [flags]"))
	}
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "serve":
		err = serve(args)
	case "namespace":
		err = namespace(args)
	case "inventory":
		err = inventory(args)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "vcsim-e2e:", err)
	os.Exit(1)
}

func serve(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	envFile := flags.String("env", "", "file to write the environment (JSON) to")
	var zones, networks, policies, items multi
	flags.Var(&zones, "zone", "a vSphere Zone, one cluster each (repeat)")
	flags.Var(&networks, "network", "a distributed port group (repeat)")
	flags.Var(&policies, "policy", "a storage policy in PBM (repeat)")
	flags.Var(&items, "item", "LIBRARY/ITEM=PATH: an OVA uploaded as a content library item (repeat)")
	_ = flags.Parse(args)
	if *envFile == "" || len(zones) == 0 {
		return errors.New("serve needs --env and at least one --zone")
	}

	model := simulator.VPX()
	model.Cluster = len(zones)
	// No standalone hosts and no VMs of vcsim's own: every VM in the
	// inventory is one VM Operator deployed.
	model.Host = 0
	model.ClusterHost = 2
	model.Machine = 0
	if err := model.Create(); err != nil {
		return err
	}
	defer model.Remove()
	ovf := model.Map().Get(*model.ServiceContent.OvfManager).(*simulator.OvfManager)
	model.Map().Put(&ovfManager{OvfManager: ovf})
	model.Service.RegisterEndpoints = true
	// TLS as vCenter serves it; VM Operator verifies it with the CA file
	// named in its provider ConfigMap (CAFilePath).
	model.Service.TLS = new(tls.Config)
	server := model.Service.NewServer()
	defer server.Close()
	caFile, err := server.CertificateFile()
	if err != nil {
		return err
	}

	ctx := context.Background()
	env, err := seed(ctx, server.URL, zones, networks, policies, items)
	if err != nil {
		return err
	}
	password, _ := simulator.DefaultLogin.Password()
	env.URL = (&url.URL{Scheme: server.URL.Scheme, Host: server.URL.Host, Path: server.URL.Path}).String()
	env.Host, env.Port = server.URL.Hostname(), server.URL.Port()
	env.Username, env.Password = simulator.DefaultLogin.Username(), password
	env.CAFile = caFile
	if err := writeJSON(*envFile, env); err != nil {
		return err
	}
	fmt.Printf("vcsim (the stand-in for vCenter) serving %s; environment in %s\n", env.URL, *envFile)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	return nil
}

// ovfManager is vcsim's OvfManager, except for two things in the import
// specs it makes, where vcsim's deploy differs from vCenter's:
//   - vcsim names an imported VM's disks "[ds] NAME/disk-N.vmdk", so deploying
//     a second VM of the same name (another namespace's, or a restored copy
//     beside its original) fails with FileAlreadyExists; vCenter gives each
//     VM's files a directory of its own. The disks' paths are left to the
//     server (the datastore alone), and vcsim picks free file names.
//   - an OVF's IDE controllers are added beside the two every VM already has
//     (keys 200 and 201), so the VM ends up with two IDE controllers on bus 0,
//     which vCenter never reports and VM Operator's status cannot hold
//     (status.hardware.controllers is keyed by type and bus: every status
//     update is refused). The OVF's controllers are mapped onto the built-in
//     ones, as vCenter does.
type ovfManager struct {
	*simulator.OvfManager
}

// builtinIDE is each built-in IDE controller's key, by bus number.
var builtinIDE = map[int32]int32{0: 200, 1: 201}

func (m *ovfManager) CreateImportSpec(ctx *simulator.Context, req *types.CreateImportSpec) soap.HasFault {
	res := m.OvfManager.CreateImportSpec(ctx, req)
	body, ok := res.(*methods.CreateImportSpecBody)
	if !ok || body.Res == nil {
		return res
	}
	spec, ok := body.Res.Returnval.ImportSpec.(*types.VirtualMachineImportSpec)
	if !ok {
		return res
	}
	controllers := map[int32]int32{}
	var kept []types.BaseVirtualDeviceConfigSpec
	for _, change := range spec.ConfigSpec.DeviceChange {
		dev := change.GetVirtualDeviceConfigSpec()
		if ide, ok := dev.Device.(*types.VirtualIDEController); ok && dev.Operation == types.VirtualDeviceConfigSpecOperationAdd {
			if key, ok := builtinIDE[ide.BusNumber]; ok {
				controllers[ide.Key] = key
				continue
			}
		}
		kept = append(kept, change)
	}
	for _, change := range kept {
		dev := change.GetVirtualDeviceConfigSpec()
		device := dev.Device.GetVirtualDevice()
		if key, ok := controllers[device.ControllerKey]; ok {
			device.ControllerKey = key
		}
		disk, ok := dev.Device.(*types.VirtualDisk)
		if !ok || dev.FileOperation != types.VirtualDeviceConfigSpecFileOperationCreate {
			continue
		}
		if backing, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			info := backing.GetVirtualDeviceFileBackingInfo()
			var p object.DatastorePath
			if p.FromString(info.FileName) {
				info.FileName = (&object.DatastorePath{Datastore: p.Datastore}).String()
			}
		}
	}
	spec.ConfigSpec.DeviceChange = kept
	return res
}

// seed does what a Supervisor's vCenter has done before VM Operator deploys
// anything: zones (clusters), port groups, storage policies and a content
// library with the images.
func seed(ctx context.Context, u *url.URL, zones, networks, policies, items []string) (*Env, error) {
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return nil, err
	}
	finder := find.NewFinder(c.Client)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	env := &Env{
		Datacenter: dc.Reference().Value, Zones: map[string]Zone{}, Networks: map[string]string{},
		StoragePolicies: map[string]string{}, Items: map[string]Item{},
	}

	clusters, err := finder.ClusterComputeResourceList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(clusters, func(i, j int) bool { return clusters[i].Name() < clusters[j].Name() })
	for i, zone := range zones {
		pool, err := clusters[i].ResourcePool(ctx)
		if err != nil {
			return nil, err
		}
		env.Zones[zone] = Zone{Cluster: clusters[i].Reference().Value, ClusterName: clusters[i].Name(),
			RootPool: pool.Reference().Value}
	}

	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	namespaces, err := folders.VmFolder.CreateFolder(ctx, "Namespaces")
	if err != nil {
		return nil, err
	}
	env.NamespacesFolder = namespaces.Reference().Value

	ds, err := finder.DefaultDatastore(ctx)
	if err != nil {
		return nil, err
	}
	env.Datastore = ds.Reference().Value

	if len(networks) > 0 {
		// The datacenter's distributed switch, which vcsim adds every host to.
		all, err := finder.NetworkList(ctx, "*")
		if err != nil {
			return nil, err
		}
		var dvs *object.DistributedVirtualSwitch
		for _, n := range all {
			if sw, ok := n.(*object.DistributedVirtualSwitch); ok {
				dvs = sw
				break
			}
		}
		if dvs == nil {
			return nil, fmt.Errorf("no distributed switch in %s", dc.Name())
		}
		var specs []types.DVPortgroupConfigSpec
		for _, name := range networks {
			specs = append(specs, types.DVPortgroupConfigSpec{Name: name, Type: string(types.DistributedVirtualPortgroupPortgroupTypeEarlyBinding), NumPorts: 64})
		}
		task, err := dvs.AddPortgroup(ctx, specs)
		if err != nil {
			return nil, err
		}
		if err := task.Wait(ctx); err != nil {
			return nil, err
		}
		for _, name := range networks {
			network, err := finder.Network(ctx, name)
			if err != nil {
				return nil, err
			}
			env.Networks[name] = network.Reference().Value
		}
	}

	if len(policies) > 0 {
		pc, err := pbm.NewClient(ctx, c.Client)
		if err != nil {
			return nil, err
		}
		for _, name := range policies {
			// A vSAN-style requirement, as the policies a Supervisor's
			// storage classes are made from (vcsim does not place by it).
			spec, err := pbm.CreateCapabilityProfileSpec(pbm.CapabilityProfileCreateSpec{
				Name: name, SubProfileName: "vSAN sub-profile", Category: "REQUIREMENT",
				CapabilityList: []pbm.Capability{{ID: "hostFailuresToTolerate", Namespace: "VSAN",
					PropertyList: []pbm.Property{{ID: "hostFailuresToTolerate", Value: "1", DataType: "int"}}}},
			})
			if err != nil {
				return nil, err
			}
			id, err := pc.CreateProfile(ctx, *spec)
			if err != nil {
				return nil, err
			}
			env.StoragePolicies[name] = id.UniqueId
		}
	}

	if len(items) > 0 {
		rc := rest.NewClient(c.Client)
		if err := rc.Login(ctx, simulator.DefaultLogin); err != nil {
			return nil, err
		}
		libraries := map[string]string{}
		m := library.NewManager(rc)
		for _, spec := range items {
			name, path, ok := strings.Cut(spec, "=")
			lib, itemName, ok2 := strings.Cut(name, "/")
			if !ok || !ok2 {
				return nil, fmt.Errorf("--item %q: want LIBRARY/ITEM=PATH", spec)
			}
			if libraries[lib] == "" {
				id, err := m.CreateLibrary(ctx, library.Library{Name: lib, Type: "LOCAL",
					Storage: []library.StorageBacking{{DatastoreID: ds.Reference().Value, Type: "DATASTORE"}}})
				if err != nil {
					return nil, err
				}
				libraries[lib] = id
			}
			item, err := upload(ctx, m, rc, libraries[lib], itemName, path)
			if err != nil {
				return nil, fmt.Errorf("--item %q: %w", spec, err)
			}
			env.Items[name] = Item{Library: lib, LibraryID: libraries[lib], ID: item.ID, Name: item.Name,
				Type: item.Type, ContentVersion: item.ContentVersion, Source: filepath.Base(path),
				VMIName: pkgutil.VMIName(item.ID)}
		}
	}
	return env, nil
}

// upload makes an OVF library item from an OVA, as an administrator does
// with "Import item" (an update session with one pushed file).
func upload(ctx context.Context, m *library.Manager, rc *rest.Client, libraryID, name, path string) (*library.Item, error) {
	id, err := m.CreateLibraryItem(ctx, library.Item{Name: name, Type: library.ItemTypeOVF, LibraryID: libraryID})
	if err != nil {
		return nil, err
	}
	session, err := m.CreateLibraryItemUpdateSession(ctx, library.Session{LibraryItemID: id})
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	file, err := m.AddLibraryItemFile(ctx, session, library.UpdateFile{Name: filepath.Base(path), SourceType: "PUSH", Size: info.Size()})
	if err != nil {
		return nil, err
	}
	target, err := url.Parse(file.UploadEndpoint.URI)
	if err != nil {
		return nil, err
	}
	params := soap.DefaultUpload
	params.ContentLength = info.Size()
	if err := rc.Upload(ctx, f, target, &params); err != nil {
		return nil, err
	}
	if err := m.CompleteLibraryItemUpdateSession(ctx, session); err != nil {
		return nil, err
	}
	return m.GetLibraryItem(ctx, id)
}

func readEnv(path string) (*Env, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := new(Env)
	return env, json.Unmarshal(data, env)
}

func connect(ctx context.Context, env *Env) (*govmomi.Client, error) {
	u, err := url.Parse(env.URL)
	if err != nil {
		return nil, err
	}
	u.User = url.UserPassword(env.Username, env.Password)
	return govmomi.NewClient(ctx, u, true)
}

// NamespaceOut is what namespace prints: the MoIDs a namespace's Zone
// objects carry (spec.managedVMs.folderMoID and poolMoIDs).
type NamespaceOut struct {
	Folder string            `json:"folder"`
	Pools  map[string]string `json:"pools"`
}

func namespace(args []string) error {
	flags := flag.NewFlagSet("namespace", flag.ExitOnError)
	envFile := flags.String("env", "", "the environment serve wrote")
	_ = flags.Parse(args)
	if flags.NArg() != 1 {
		return errors.New("namespace needs one NAME")
	}
	name := flags.Arg(0)
	env, err := readEnv(*envFile)
	if err != nil {
		return err
	}
	ctx := context.Background()
	c, err := connect(ctx, env)
	if err != nil {
		return err
	}
	// A namespace deleted and made again (a disaster recovery) finds its
	// folder and pools still there: vcsim keeps what the Supervisor would
	// remove, so they are reused.
	index := object.NewSearchIndex(c.Client)
	parent := types.ManagedObjectReference{Type: "Folder", Value: env.NamespacesFolder}
	out := NamespaceOut{Pools: map[string]string{}}
	if found, err := index.FindChild(ctx, parent, name); err != nil {
		return err
	} else if found != nil {
		out.Folder = found.Reference().Value
	} else {
		folder, err := object.NewFolder(c.Client, parent).CreateFolder(ctx, name)
		if err != nil {
			return err
		}
		out.Folder = folder.Reference().Value
	}
	for zone, z := range env.Zones {
		root := types.ManagedObjectReference{Type: "ResourcePool", Value: z.RootPool}
		if found, err := index.FindChild(ctx, root, name); err != nil {
			return err
		} else if found != nil {
			out.Pools[zone] = found.Reference().Value
			continue
		}
		pool, err := object.NewResourcePool(c.Client, root).Create(ctx, name, types.DefaultResourceConfigSpec())
		if err != nil {
			return err
		}
		out.Pools[zone] = pool.Reference().Value
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// VM is one VM as inventory prints it.
type VM struct {
	MoID           string            `json:"moid"`
	Name           string            `json:"name"`
	InstanceUUID   string            `json:"instanceUUID"`
	BiosUUID       string            `json:"biosUUID"`
	PowerState     string            `json:"powerState"`
	BootTime       *time.Time        `json:"bootTime"`
	ChangeVersion  string            `json:"changeVersion"`
	NumCPU         int32             `json:"numCPU"`
	MemoryMB       int32             `json:"memoryMB"`
	MACs           []string          `json:"macs"`
	Networks       []string          `json:"networks"`
	DiskKB         []int64           `json:"diskKB"`
	Controllers    []string          `json:"controllers"`
	ResourcePool   string            `json:"resourcePool"`
	Folder         string            `json:"folder"`
	ExtraConfig    map[string]string `json:"extraConfig"`
	ManagedBy      string            `json:"managedBy"`
	VAppProduct    string            `json:"vAppProduct"`
	NetworkMoIDs   []string          `json:"networkMoIDs"`
	GuestID        string            `json:"guestID"`
	HardwareVer    string            `json:"hardwareVersion"`
	CreateDate     *time.Time        `json:"createDate"`
	ConfigModified time.Time         `json:"configModified"`
}

// Event is one VM event vcsim recorded.
type Event struct {
	Type    string    `json:"type"`
	VM      string    `json:"vm"`
	VMName  string    `json:"vmName"`
	Time    time.Time `json:"time"`
	Key     int32     `json:"key"`
	Message string    `json:"message"`
}

// The ExtraConfig keys inventory reports: VM Operator's record of which
// VirtualMachine object ("namespace/name") manages the VM.
var extraConfigKeys = map[string]bool{"vmservice.namespacedName": true}

func inventory(args []string) error {
	flags := flag.NewFlagSet("inventory", flag.ExitOnError)
	envFile := flags.String("env", "", "the environment serve wrote")
	_ = flags.Parse(args)
	env, err := readEnv(*envFile)
	if err != nil {
		return err
	}
	ctx := context.Background()
	c, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer func() { _ = c.Logout(ctx) }()

	v, err := view.NewManager(c.Client).CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return err
	}
	defer func() { _ = v.Destroy(ctx) }()
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"},
		[]string{"name", "config", "runtime.powerState", "summary.runtime", "resourcePool", "parent", "network"}, &vms); err != nil {
		return err
	}
	// Port group names, for each VM's networks.
	names := map[string]string{}
	for name, moid := range env.Networks {
		names[moid] = name
	}

	out := struct {
		VMs    []VM    `json:"vms"`
		Events []Event `json:"events"`
	}{VMs: []VM{}, Events: []Event{}}
	for _, vm := range vms {
		// vcsim sets summary.runtime.bootTime on power-on (not runtime.bootTime).
		item := VM{MoID: vm.Self.Value, Name: vm.Name, PowerState: string(vm.Runtime.PowerState),
			BootTime: vm.Summary.Runtime.BootTime, ExtraConfig: map[string]string{}}
		if vm.ResourcePool != nil {
			item.ResourcePool = vm.ResourcePool.Value
		}
		if vm.Parent != nil {
			item.Folder = vm.Parent.Value
		}
		for _, n := range vm.Network {
			item.NetworkMoIDs = append(item.NetworkMoIDs, n.Value)
			if name, ok := names[n.Value]; ok {
				item.Networks = append(item.Networks, name)
			} else {
				item.Networks = append(item.Networks, n.Value)
			}
		}
		if cfg := vm.Config; cfg != nil {
			item.InstanceUUID, item.BiosUUID = cfg.InstanceUuid, cfg.Uuid
			item.ChangeVersion, item.GuestID, item.HardwareVer = cfg.ChangeVersion, cfg.GuestId, cfg.Version
			item.NumCPU, item.MemoryMB = cfg.Hardware.NumCPU, cfg.Hardware.MemoryMB
			item.CreateDate, item.ConfigModified = cfg.CreateDate, cfg.Modified
			if cfg.ManagedBy != nil {
				item.ManagedBy = cfg.ManagedBy.ExtensionKey + "/" + cfg.ManagedBy.Type
			}
			if vapp := cfg.VAppConfig; vapp != nil {
				if info := vapp.GetVmConfigInfo(); info != nil && len(info.Product) > 0 {
					item.VAppProduct = info.Product[0].Name
				}
			}
			for _, d := range cfg.Hardware.Device {
				switch dev := d.(type) {
				case types.BaseVirtualEthernetCard:
					item.MACs = append(item.MACs, dev.GetVirtualEthernetCard().MacAddress)
				case *types.VirtualDisk:
					item.DiskKB = append(item.DiskKB, dev.CapacityInKB)
				case types.BaseVirtualController:
					ctl := dev.GetVirtualController()
					item.Controllers = append(item.Controllers, fmt.Sprintf("%T:%d:key%d", d, ctl.BusNumber, ctl.Key))
				}
			}
			for _, o := range cfg.ExtraConfig {
				if opt := o.GetOptionValue(); extraConfigKeys[opt.Key] {
					item.ExtraConfig[opt.Key] = fmt.Sprint(opt.Value)
				}
			}
		}
		out.VMs = append(out.VMs, item)
	}
	sort.Slice(out.VMs, func(i, j int) bool { return out.VMs[i].MoID < out.VMs[j].MoID })

	// vcsim keeps the latest 1000 events; a page holds at most that many.
	events, err := event.NewManager(c.Client).QueryEvents(ctx, types.EventFilterSpec{
		EventTypeId: []string{"VmPoweredOnEvent", "VmPoweredOffEvent", "VmReconfiguredEvent", "VmRemovedEvent",
			"VmCreatedEvent", "VmDeployedEvent", "VmRegisteredEvent", "VmRenamedEvent"},
		MaxCount: 1000,
	})
	if err != nil {
		return err
	}
	for _, e := range events {
		base := e.GetEvent()
		if base.Vm == nil {
			continue
		}
		item := Event{Type: strings.TrimPrefix(fmt.Sprintf("%T", e), "*types."), Time: base.CreatedTime, Key: base.Key,
			Message: base.FullFormattedMessage, VM: base.Vm.Vm.Value, VMName: base.Vm.Name}
		out.Events = append(out.Events, item)
	}
	sort.Slice(out.Events, func(i, j int) bool { return out.Events[i].Key < out.Events[j].Key })
	return json.NewEncoder(os.Stdout).Encode(out)
}

func writeJSON(path string, value any) error {
	data, err := json.MarshalIndent(value, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
