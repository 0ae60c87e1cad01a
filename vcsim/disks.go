package main

// Real virtual disks (with -disks): each VM's first VirtualDisk is a real VMDK in its
// datastore directory, built by vcsim/mkdisk.sh from the VM's guest tree (ext4 for Linux
// guests, NTFS for Windows guests, whose tree is <guest root>/<VM>/C). The disk is brought up
// to date when the VM powers off and when a snapshot is taken; a snapshot freezes the
// current disk (rebuilt to the tree at that moment) and moves the VM onto a new delta disk
// whose descriptor names the frozen one (backing.parent, layoutEx.disk[].chain).
//
// The chain of a VM's disk follows the path from the root snapshot to the current one:
// element i (i < number of snapshots on the path) holds the tree of the i-th snapshot,
// the last element (the leaf, the disk the VM writes) holds the live tree as of the last
// power-off. Element 0 is the library's file name (e.g. disk1.vmdk), element i > 0 is
// disk1-00000i.vmdk. Every snapshot operation reconciles the files with the new path:
// elements that already hold the right tree stay, the rest are rebuilt from the recorded
// snapshot trees (snapshots.go keeps them), deeper files are deleted.
//
// extraConfig keys (ReconfigVM_Task), read whenever a disk is (re)built:
//   vcsim.disk.layout = gpt | mbr | none | lvm   (lvm: GPT partition holding an LVM2 PV)
//   vcsim.disk.format = monolithicSparse | monolithicFlat | streamOptimized   (base disk)
//   vcsim.disk.fs     = ext4 | ntfs | xfs        (default by guestId)
//   vcsim.disk.luks   = TRUE                     (a LUKS2 header instead of a file system)
//   vcsim.disk.inaccessible = TRUE               (/folder answers 404 for the VM's files)

import (
	"fmt"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	DiskLayoutKey       = "vcsim.disk.layout"
	DiskFormatKey       = "vcsim.disk.format"
	DiskFSKey           = "vcsim.disk.fs"
	DiskLUKSKey         = "vcsim.disk.luks"
	DiskInaccessibleKey = "vcsim.disk.inaccessible"
)

// diskOpts: -disks turns real disks on; -mkdisk names the build script.
var diskOpts struct {
	enabled bool
	script  string
}

// diskLayout is how one VM's disk is built.
type diskLayout struct {
	fs, table, format string
	lvm, luks         bool
	windows           bool
	mode              string // backing diskMode
}

// vmDisk is the state of one VM's disk chain (guarded by mu, held across builds).
type vmDisk struct {
	mu     sync.Mutex
	built  bool
	chain  []string // snapshot moref values whose trees elements 0..len-1 hold
	dsName string   // datastore name, e.g. LocalDS_0
	dsDir  string   // the datastore's directory on the host
	dir    string   // the VM's directory inside the datastore
	base   string   // file name of element 0, e.g. disk1.vmdk
}

var vmDisks = struct {
	sync.Mutex
	m map[string]*vmDisk
}{m: map[string]*vmDisk{}}

func diskOf(ref types.ManagedObjectReference) *vmDisk {
	vmDisks.Lock()
	defer vmDisks.Unlock()
	d := vmDisks.m[ref.Value]
	if d == nil {
		d = &vmDisk{}
		vmDisks.m[ref.Value] = d
	}
	return d
}

// fileName is the name of chain element i.
func (d *vmDisk) fileName(i int) string {
	if i == 0 {
		return d.base
	}
	return fmt.Sprintf("%s-%06d.vmdk", strings.TrimSuffix(d.base, ".vmdk"), i)
}

func (d *vmDisk) hostPath(i int) string {
	return filepath.Join(d.dsDir, d.dir, d.fileName(i))
}

func (d *vmDisk) dsPath(name string) string {
	return fmt.Sprintf("[%s] %s", d.dsName, path.Join(d.dir, name))
}

// findMkdisk locates mkdisk.sh: -mkdisk, else vcsim/mkdisk.sh beside the binary's build/.
func findMkdisk(flagValue string) (string, error) {
	candidates := []string{flagValue}
	if flagValue == "" {
		candidates = nil
		if exe, err := os.Executable(); err == nil {
			candidates = append(candidates, filepath.Join(filepath.Dir(exe), "..", "vcsim", "mkdisk.sh"))
		}
		candidates = append(candidates, filepath.Join("vcsim", "mkdisk.sh"))
	}
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && !st.IsDir() {
			abs, _ := filepath.Abs(c)
			return abs, nil
		}
	}
	return "", fmt.Errorf("-disks: mkdisk.sh not found (give -mkdisk PATH)")
}

// firstDisk returns the VM's first VirtualDisk; the caller holds the VM's lock.
func firstDisk(vm *simulator.VirtualMachine) *types.VirtualDisk {
	if vm.Config == nil {
		return nil
	}
	for _, dev := range vm.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok {
			if _, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); flat {
				return disk
			}
		}
	}
	return nil
}

// rootBacking is the base of a backing chain.
func rootBacking(b *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	for i := 0; b.Parent != nil && i < 1024; i++ {
		b = b.Parent
	}
	return b
}

// readDiskSetup reads what a build needs from the VM (under its lock) and fills d's paths
// the first time.
func readDiskSetup(vm *simulator.VirtualMachine, d *vmDisk) (diskLayout, string, error) {
	var (
		lay  diskLayout
		name string
		err  error
	)
	simulator.Map.WithLock(vm, func() {
		name = vm.Name
		disk := firstDisk(vm)
		if disk == nil {
			err = fmt.Errorf("VM %s has no virtual disk", vm.Name)
			return
		}
		backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		lay.mode = backing.DiskMode
		if d.base == "" {
			var p object.DatastorePath
			if !p.FromString(rootBacking(backing).FileName) {
				err = fmt.Errorf("VM %s: cannot parse disk file name %q", vm.Name, backing.FileName)
				return
			}
			d.dsName, d.dir, d.base = p.Datastore, path.Dir(p.Path), path.Base(p.Path)
		}
		lay.windows = vm.Config != nil && strings.HasPrefix(strings.ToLower(vm.Config.GuestId), "win")
		lay.fs, lay.table, lay.format = "ext4", "gpt", "monolithicSparse"
		if lay.windows {
			lay.fs = "ntfs"
		}
		if v, ok := extraConfigValue(vm, DiskFSKey); ok && v != "" {
			lay.fs = strings.ToLower(v)
		}
		if v, ok := extraConfigValue(vm, DiskLayoutKey); ok && v != "" {
			switch strings.ToLower(v) {
			case "lvm":
				lay.lvm = true
			default:
				lay.table = strings.ToLower(v)
			}
		}
		if v, ok := extraConfigValue(vm, DiskFormatKey); ok && v != "" {
			lay.format = v
		}
		if v, ok := extraConfigValue(vm, DiskLUKSKey); ok {
			lay.luks = strings.EqualFold(v, "true")
		}
	})
	if err != nil {
		return lay, name, err
	}
	if d.dsDir == "" {
		for _, e := range simulator.Map.All("Datastore") {
			if ds, ok := e.(*simulator.Datastore); ok && ds.Name == d.dsName {
				d.dsDir = ds.Info.GetDatastoreInfo().Url
			}
		}
		if d.dsDir == "" {
			return lay, name, fmt.Errorf("VM %s: datastore %s not found", name, d.dsName)
		}
	}
	return lay, name, nil
}

// treeDir is the directory mkdisk copies: the guest tree, or its C: drive for Windows.
func treeDir(root string, lay diskLayout) (string, error) {
	if !lay.windows {
		return root, os.MkdirAll(root, 0o755)
	}
	c := guestLookupFold(root, "C")
	dir := filepath.Join(root, c)
	return dir, os.MkdirAll(dir, 0o755)
}

func runTool(dir string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("%s", msg)
	}
	return nil
}

// buildElement writes chain element i from the tree in src (a delta over i-1 when i > 0).
func (d *vmDisk) buildElement(i int, src string, lay diskLayout) error {
	args := []string{"--src", src, "--out", d.hostPath(i), "--fs", lay.fs}
	if lay.lvm {
		args = append(args, "--lvm")
	} else {
		args = append(args, "--table", lay.table)
	}
	if lay.luks {
		args = append(args, "--luks")
	}
	if i == 0 {
		args = append(args, "--format", lay.format)
		// a format change leaves no stale extent behind (the library created an empty one)
		_ = os.Remove(strings.TrimSuffix(d.hostPath(0), ".vmdk") + "-flat.vmdk")
	} else {
		args = append(args, "--parent", d.hostPath(i-1))
	}
	start := time.Now()
	if err := runTool(filepath.Join(d.dsDir, d.dir), diskOpts.script, args...); err != nil {
		return fmt.Errorf("building %s: %s", d.fileName(i), err)
	}
	log.Printf("disk %s built from %s in %s", d.dsPath(d.fileName(i)), src, time.Since(start).Round(time.Millisecond))
	return nil
}

// emptyDelta writes chain element i as a delta over i-1 with no clusters of its own (under
// a temporary name in the same directory, then renamed: readers never see half a file).
func (d *vmDisk) emptyDelta(i int) error {
	dir := filepath.Join(d.dsDir, d.dir)
	tmp := "." + d.fileName(i) + ".tmp"
	err := runTool(dir, "qemu-img", "create", "-q", "-f", "vmdk",
		"-o", "subformat=monolithicSparse,adapter_type=lsilogic",
		"-b", d.fileName(i-1), "-F", "vmdk", tmp)
	if err == nil {
		err = os.Rename(filepath.Join(dir, tmp), d.hostPath(i))
	}
	if err != nil {
		_ = os.Remove(filepath.Join(dir, tmp))
		return fmt.Errorf("creating %s: %s", d.fileName(i), err)
	}
	return nil
}

// snapshotPath lists the snapshots from the root to the current one; the caller holds the
// VM's lock.
func snapshotPath(vm *simulator.VirtualMachine) []string {
	if vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return nil
	}
	want := vm.Snapshot.CurrentSnapshot.Value
	var walk func(trees []types.VirtualMachineSnapshotTree, prefix []string, depth int) []string
	walk = func(trees []types.VirtualMachineSnapshotTree, prefix []string, depth int) []string {
		if depth > 256 {
			return nil
		}
		for _, t := range trees {
			p := append(append([]string{}, prefix...), t.Snapshot.Value)
			if t.Snapshot.Value == want {
				return p
			}
			if found := walk(t.ChildSnapshotList, p, depth+1); found != nil {
				return found
			}
		}
		return nil
	}
	return walk(vm.Snapshot.RootSnapshotList, nil, 0)
}

// leafMode says what the leaf holds after a reconcile.
type leafMode int

const (
	leafLive  leafMode = iota // rebuilt from the live guest tree (power-off, consolidation)
	leafEmpty                 // a new, empty delta (after a snapshot or a revert)
)

// reconcileDisk brings the VM's disk files in line with its snapshot path and publishes
// the chain in the inventory. Independent disks are outside snapshots: they keep their
// single file (and independent_nonpersistent disks are never rebuilt after the first build).
func reconcileDisk(ref types.ManagedObjectReference, mode leafMode) {
	if !diskOpts.enabled {
		return
	}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	d := diskOf(ref)
	d.mu.Lock()
	defer d.mu.Unlock()
	lay, name, err := readDiskSetup(vm, d)
	if err != nil {
		log.Printf("disk: %s", err)
		return
	}
	var want []string
	simulator.Map.WithLock(vm, func() { want = snapshotPath(vm) })
	independent := strings.HasPrefix(lay.mode, "independent")
	if independent {
		want = nil
		if d.built && (lay.mode == string(types.VirtualDiskModeIndependent_nonpersistent) || mode == leafEmpty) {
			return
		}
		mode = leafLive
	}
	keep := 0
	if d.built {
		for keep < len(want) && keep < len(d.chain) && want[keep] == d.chain[keep] {
			keep++
		}
	}
	live, err := treeDir(vmRootDir(name), lay)
	if err != nil {
		log.Printf("disk of %s: %s", name, err)
		return
	}
	for i := keep; i < len(want); i++ {
		src, terr := treeDir(snapshotDir(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: want[i]}), lay)
		if terr == nil {
			terr = d.buildElement(i, src, lay)
		}
		if terr != nil {
			log.Printf("disk of %s: %s", name, terr)
			d.built = false
			return
		}
	}
	leaf := len(want)
	if mode == leafEmpty && leaf > 0 {
		err = d.emptyDelta(leaf)
	} else {
		err = d.buildElement(leaf, live, lay)
	}
	if err != nil {
		log.Printf("disk of %s: %s", name, err)
		d.built = false
		return
	}
	// files deeper than the leaf belong to snapshots that are gone (they are consecutive)
	for i := leaf + 1; i < leaf+1+1024; i++ {
		if err := os.Remove(d.hostPath(i)); err != nil && os.IsNotExist(err) {
			break
		}
	}
	d.chain = want
	d.built = true
	d.publish(vm, lay, leaf)
}

// virtualSize reads a VMDK's capacity from its descriptor (the sum of its extents' sectors).
func virtualSize(file string) int64 {
	f, err := os.Open(file)
	if err != nil {
		return 0
	}
	defer f.Close()
	buf := make([]byte, 64*1024)
	n, _ := f.Read(buf)
	var sectors int64
	for _, line := range strings.Split(string(buf[:n]), "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 3 && (fields[0] == "RW" || fields[0] == "RDONLY") {
			if s, perr := strconv.ParseInt(fields[1], 10, 64); perr == nil {
				sectors += s
			}
		}
	}
	return sectors * 512
}

// publish sets the VM's disk backing chain, capacity and file layout (layoutEx) to the
// files of elements 0..leaf, as a real vCenter reports them.
func (d *vmDisk) publish(vm *simulator.VirtualMachine, lay diskLayout, leaf int) {
	size := virtualSize(d.hostPath(0))
	simulator.Map.WithLock(vm, func() {
		disk := firstDisk(vm)
		if disk == nil {
			return
		}
		old := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		var chain *types.VirtualDiskFlatVer2BackingInfo
		for i := 0; i <= leaf; i++ {
			b := &types.VirtualDiskFlatVer2BackingInfo{
				VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
					FileName:  d.dsPath(d.fileName(i)),
					Datastore: old.Datastore,
				},
				DiskMode:        old.DiskMode,
				ThinProvisioned: types.NewBool(true),
				Uuid:            old.Uuid,
				Parent:          chain,
			}
			if i > 0 {
				b.DeltaDiskFormat = string(types.VirtualDiskDeltaDiskFormatRedoLogFormat)
			}
			chain = b
		}
		disk.Backing = chain
		if size > 0 {
			disk.CapacityInBytes = size
			disk.CapacityInKB = size / 1024
		}

		// layoutEx: the other files stay, disk files are listed anew
		var files []types.VirtualMachineFileLayoutExFileInfo
		key := int32(0)
		for _, f := range vm.LayoutEx.File {
			if f.Type == string(types.VirtualMachineFileLayoutExFileTypeDiskDescriptor) ||
				f.Type == string(types.VirtualMachineFileLayoutExFileTypeDiskExtent) {
				continue
			}
			files = append(files, f)
			if f.Key >= key {
				key = f.Key + 1
			}
		}
		unit := func(i int) types.VirtualMachineFileLayoutExDiskUnit {
			var u types.VirtualMachineFileLayoutExDiskUnit
			names := []string{d.fileName(i)}
			if i == 0 && lay.format == "monolithicFlat" {
				names = append(names, strings.TrimSuffix(d.base, ".vmdk")+"-flat.vmdk")
			}
			for j, n := range names {
				typ := types.VirtualMachineFileLayoutExFileTypeDiskDescriptor
				if j > 0 {
					typ = types.VirtualMachineFileLayoutExFileTypeDiskExtent
				}
				var sz int64
				if st, err := os.Stat(filepath.Join(d.dsDir, d.dir, n)); err == nil {
					sz = st.Size()
				}
				files = append(files, types.VirtualMachineFileLayoutExFileInfo{
					Key: key, Name: d.dsPath(n), Type: string(typ), Size: sz,
					UniqueSize: sz, Accessible: types.NewBool(true),
				})
				u.FileKey = append(u.FileKey, key)
				key++
			}
			return u
		}
		var units []types.VirtualMachineFileLayoutExDiskUnit
		for i := 0; i <= leaf; i++ {
			units = append(units, unit(i))
		}
		layout := *vm.LayoutEx
		layout.File = files
		layout.Disk = []types.VirtualMachineFileLayoutExDiskLayout{{Key: disk.Key, Chain: units}}
		var snaps []types.VirtualMachineFileLayoutExSnapshotLayout
		for _, s := range layout.Snapshot {
			idx := -1
			for i, v := range d.chain {
				if v == s.Key.Value {
					idx = i
				}
			}
			if idx >= 0 {
				s.Disk = []types.VirtualMachineFileLayoutExDiskLayout{{Key: disk.Key, Chain: units[:idx+1]}}
			}
			snaps = append(snaps, s)
		}
		layout.Snapshot = snaps
		layout.Timestamp = time.Now()
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
			{Name: "layoutEx", Val: &layout},
		})
	})
}

// buildAllDisks builds every VM's disk at start (two at a time: they are CPU-bound).
func buildAllDisks() {
	var refs []types.ManagedObjectReference
	for _, e := range simulator.Map.All("VirtualMachine") {
		refs = append(refs, e.Reference())
	}
	work := make(chan types.ManagedObjectReference)
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ref := range work {
				reconcileDisk(ref, leafLive)
			}
		}()
	}
	for _, ref := range refs {
		work <- ref
	}
	close(work)
	wg.Wait()
}

// independentDisk reports whether a VM has a disk in an independent mode.
func independentDisk(ref types.ManagedObjectReference) bool {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	found := false
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		for _, dev := range vm.Config.Hardware.Device {
			if disk, isDisk := dev.(*types.VirtualDisk); isDisk {
				if b, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); flat && strings.HasPrefix(b.DiskMode, "independent") {
					found = true
				}
			}
		}
	})
	return found
}

// afterPowerOffDisk rebuilds the leaf once a power-off succeeded.
func afterPowerOffDisk(ref types.ManagedObjectReference) func([]byte) {
	return func(response []byte) {
		if diskOpts.enabled && succeeded(response) {
			reconcileDisk(ref, leafLive)
		}
	}
}

// diskInaccessible reports whether a datastore-relative file belongs to a VM whose disks
// are marked inaccessible (vcsim.disk.inaccessible = TRUE).
func diskInaccessible(dsName, rel string) bool {
	dir := path.Dir(path.Clean("/" + rel))
	vmDisks.Lock()
	var match []string
	for ref, d := range vmDisks.m {
		if d.dsName == dsName && "/"+d.dir == dir {
			match = append(match, ref)
		}
	}
	vmDisks.Unlock()
	for _, ref := range match {
		vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: ref}).(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		bad := false
		simulator.Map.WithLock(vm, func() {
			v, _ := extraConfigValue(vm, DiskInaccessibleKey)
			bad = strings.EqualFold(v, "true")
		})
		if bad {
			return true
		}
	}
	return false
}

// withDisk runs a fix-up and then, if the task succeeded, reconciles the disk of the VM ref
// names (nil: the VM the task returned, e.g. a clone: its disk is built from the copied tree).
func withDisk(first func([]byte), ref func() types.ManagedObjectReference, mode leafMode) func([]byte) {
	return func(response []byte) {
		if first != nil {
			first(response)
		}
		if !diskOpts.enabled || !succeeded(response) {
			return
		}
		var r types.ManagedObjectReference
		if ref != nil {
			r = ref()
		} else if _, res := taskResult(response); res != nil {
			r, _ = res.(types.ManagedObjectReference)
		}
		if r.Type == "VirtualMachine" || (ref != nil && r.Value != "") {
			reconcileDisk(r, mode)
		}
	}
}

// snapshotVM names the VM a snapshot belongs to (empty once the snapshot is gone).
func snapshotVM(snap types.ManagedObjectReference) types.ManagedObjectReference {
	var vmRef types.ManagedObjectReference
	if s, ok := simulator.Map.Get(snap).(*simulator.VirtualMachineSnapshot); ok {
		simulator.Map.WithLock(s, func() { vmRef = s.Vm })
	}
	return vmRef
}

// snapshotRefused answers CreateSnapshot_Task with a task that fails with fault, as vSphere
// does for a memory snapshot of a VM with an independent disk (MemorySnapshotOnIndependentDisk;
// without memory the snapshot is taken and independent disks stay out of it) and for a VM
// whose flags.snapshotDisabled is set (SnapshotDisabled).
func snapshotRefused(ref types.ManagedObjectReference, fault types.BaseMethodFault) *httptest.ResponseRecorder {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return soapResponse(&methods.CreateSnapshot_TaskBody{Fault_: simulator.Fault("managed object not found", &types.ManagedObjectNotFound{Obj: ref})})
	}
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, fault
	})
	return soapResponse(&methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()}})
}

// snapshotsDisabled reports whether a VM's flags.snapshotDisabled is set.
func snapshotsDisabled(ref types.ManagedObjectReference) bool {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	disabled := false
	simulator.Map.WithLock(vm, func() {
		disabled = vm.Config != nil && vm.Config.Flags.SnapshotDisabled != nil && *vm.Config.Flags.SnapshotDisabled
	})
	return disabled
}

// beforeDiskEdit lets ReconfigVM_Task edit a real disk: the library checks that every disk
// file it names exists as a descriptor and a "-flat" extent, which a sparse disk does not
// have. Empty placeholders stand in during the call; the returned func removes them and
// lists the VM's real disk files again.
func beforeDiskEdit(req *types.ReconfigVM_Task) func() {
	if !diskOpts.enabled {
		return nil
	}
	var placeholders []string
	for _, change := range req.Spec.DeviceChange {
		spec := change.GetVirtualDeviceConfigSpec()
		disk, ok := spec.Device.(*types.VirtualDisk)
		if !ok || spec.Operation != types.VirtualDeviceConfigSpecOperationEdit {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		d := diskOf(req.This)
		d.mu.Lock()
		if d.built {
			var p object.DatastorePath
			if p.FromString(b.FileName) && p.Datastore == d.dsName {
				flat := filepath.Join(d.dsDir, strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk")
				if _, err := os.Stat(flat); os.IsNotExist(err) {
					if f, cerr := os.OpenFile(flat, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); cerr == nil {
						_ = f.Close()
						placeholders = append(placeholders, flat)
					}
				}
			}
		}
		d.mu.Unlock()
	}
	if len(placeholders) == 0 {
		return nil
	}
	return func() {
		for _, p := range placeholders {
			_ = os.Remove(p)
		}
		republishDisk(req.This)
	}
}

// republishDisk lists the VM's current disk files again (no rebuild).
func republishDisk(ref types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	d := diskOf(ref)
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.built {
		return
	}
	lay, _, err := readDiskSetup(vm, d)
	if err != nil {
		return
	}
	d.publish(vm, lay, len(d.chain))
}

// keepSourceDisks works around the library's CloneVM_Task, which empties the file name and
// parent of the source VM's own disk backings (the clone's devices are the source's
// objects) and so leaves the source naming the clone's disk file. It records the source's
// backings before the call; the returned func gives the source its own disk devices back.
func keepSourceDisks(ref types.ManagedObjectReference) func() {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return func() {}
	}
	saved := map[int32]types.VirtualDiskFlatVer2BackingInfo{}
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		for _, dev := range vm.Config.Hardware.Device {
			if disk, isDisk := dev.(*types.VirtualDisk); isDisk {
				if b, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); flat {
					saved[disk.Key] = *b
				}
			}
		}
	})
	return func() {
		simulator.Map.WithLock(vm, func() {
			if vm.Config == nil {
				return
			}
			devices := append([]types.BaseVirtualDevice{}, vm.Config.Hardware.Device...)
			changed := false
			for i, dev := range devices {
				disk, isDisk := dev.(*types.VirtualDisk)
				if !isDisk {
					continue
				}
				b, known := saved[disk.Key]
				if !known {
					continue
				}
				own := *disk
				backing := b
				own.Backing = &backing
				devices[i] = &own
				changed = true
			}
			if changed {
				simulator.Map.Update(vm, []types.PropertyChange{{Name: "config.hardware.device", Val: devices}})
			}
		})
	}
}
