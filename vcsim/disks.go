package main

// Real virtual disks (with -disks): each of a VM's VirtualDisks is a real VMDK in its
// datastore directory, built by vcsim/mkdisk.sh from the VM's guest tree (ext4 for Linux
// guests, NTFS for Windows guests). The disks are brought up to date when the VM powers off
// and when a snapshot is taken; a snapshot freezes each current disk (rebuilt to the tree at
// that moment) and moves the VM onto a new delta disk per disk whose descriptor names the
// frozen one (backing.parent, layoutEx.disk[].chain).
//
// Which part of the tree a disk holds (disk_trees.go): disks are numbered in the guest's
// order (controller bus number, then unit number: sda, sdb... / disk 0, 1...). Windows:
// disk n holds drive letter C, D, ... (<guest root>/<VM>/C, /D, ...). Linux: disk 1 holds
// the tree but the mount points of the other disks, with one /etc/fstab line per other
// disk (/dev/sdX1 MOUNT FS); disk n > 1 holds the subtree at its mount point
// (vcsim.disk<n>.mount, default /data for disk 2, /data<n> after). A disk added with a file
// of its own (non-empty when first seen, e.g. a VMDK the client built) is left as it is.
//
// The chain of each disk follows the path from the root snapshot to the current one:
// element i (i < number of snapshots on the path) holds the tree of the i-th snapshot,
// the last element (the leaf, the disk the VM writes) holds the live tree as of the last
// power-off. Element 0 is the library's file name (e.g. disk1.vmdk), element i > 0 is
// disk1-00000i.vmdk. Every snapshot operation reconciles the files with the new path:
// elements that already hold the right tree stay, the rest are rebuilt from the recorded
// snapshot trees (snapshots.go keeps them), deeper files are deleted.
//
// extraConfig keys (ReconfigVM_Task), read whenever a disk is (re)built; for disk n > 1
// the same keys are vcsim.disk<n>.* (e.g. vcsim.disk2.fs) and nothing is inherited:
//   vcsim.disk.layout = gpt | mbr | none | lvm   (lvm: GPT partition holding an LVM2 PV;
//                                                 disk 1 only: the VG is always vg0)
//   vcsim.disk.format = monolithicSparse | monolithicFlat | streamOptimized   (base disk)
//   vcsim.disk.fs     = ext4 | ntfs | xfs        (default by guestId)
//   vcsim.disk.luks   = TRUE                     (a LUKS2 header instead of a file system)
//   vcsim.disk.inaccessible = TRUE               (/folder answers 404 for the VM's files;
//                                                 vcsim.disk<n>.inaccessible: that disk's)
//   vcsim.disk<n>.mount = /PATH                  (Linux, n > 1: the subtree the disk holds)

import (
	"fmt"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
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
	DiskMountKey        = "vcsim.disk.mount" // as vcsim.disk<n>.mount, n > 1 (Linux guests)
)

// diskOpts: -disks turns real disks on; -mkdisk names the build script.
var diskOpts struct {
	enabled bool
	script  string
}

// diskKey is the extraConfig key of disk n (1-based, guest order): key itself for disk 1,
// vcsim.disk<n>.<name> for the others.
func diskKey(n int, key string) string {
	if n <= 1 {
		return key
	}
	return strings.Replace(key, "vcsim.disk.", fmt.Sprintf("vcsim.disk%d.", n), 1)
}

// diskLayout is how one disk is built.
type diskLayout struct {
	n                 int // position in the guest's disk order, from 1
	fs, table, format string
	lvm, luks         bool
	windows           bool
	mode              string // backing diskMode
	mount             string // Linux: "/" for disk 1, the subtree otherwise; Windows: "C", "D", ...
}

// diskChain is the state of one disk's chain.
type diskChain struct {
	owned  bool     // built by the simulator (false: a file the client attached, left alone)
	built  bool
	chain  []string // snapshot moref values whose trees elements 0..len-1 hold
	dsName string   // datastore name, e.g. LocalDS_0
	dsDir  string   // the datastore's directory on the host
	dir    string   // the disk's directory inside the datastore
	base   string   // file name of element 0, e.g. disk1.vmdk
}

// vmDisk is the state of one VM's disks by device key (guarded by mu, held across builds).
type vmDisk struct {
	mu    sync.Mutex
	disks map[int32]*diskChain
}

// diskPlace is where one disk's files are, for /folder (vcsim.disk<n>.inaccessible).
type diskPlace struct {
	n                 int
	dsName, dir, base string
}

var vmDisks = struct {
	sync.Mutex
	m      map[string]*vmDisk
	places map[string][]diskPlace // VM moref value -> its disks' places
}{m: map[string]*vmDisk{}, places: map[string][]diskPlace{}}

func diskOf(ref types.ManagedObjectReference) *vmDisk {
	vmDisks.Lock()
	defer vmDisks.Unlock()
	d := vmDisks.m[ref.Value]
	if d == nil {
		d = &vmDisk{disks: map[int32]*diskChain{}}
		vmDisks.m[ref.Value] = d
	}
	return d
}

// fileName is the name of chain element i.
func (d *diskChain) fileName(i int) string {
	if i == 0 {
		return d.base
	}
	return fmt.Sprintf("%s-%06d.vmdk", strings.TrimSuffix(d.base, ".vmdk"), i)
}

func (d *diskChain) hostPath(i int) string {
	return filepath.Join(d.dsDir, d.dir, d.fileName(i))
}

func (d *diskChain) dsPath(name string) string {
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

// guestDisks returns the VM's file-backed VirtualDisks in the order the guest numbers them
// (sda, sdb, ... / disk 0, 1, ...): by the controller's bus number (then its key), then
// the unit number; the caller holds the VM's lock. vsphere_av/vsphere/disks.py orders
// them the same way.
func guestDisks(vm *simulator.VirtualMachine) []*types.VirtualDisk {
	if vm.Config == nil {
		return nil
	}
	bus := map[int32]int32{}
	var disks []*types.VirtualDisk
	for _, dev := range vm.Config.Hardware.Device {
		if c, ok := dev.(types.BaseVirtualController); ok {
			bus[dev.GetVirtualDevice().Key] = c.GetVirtualController().BusNumber
		}
		if disk, ok := dev.(*types.VirtualDisk); ok {
			if _, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); flat {
				disks = append(disks, disk)
			}
		}
	}
	order := func(d *types.VirtualDisk) [4]int64 {
		unit := int64(-1)
		if d.UnitNumber != nil {
			unit = int64(*d.UnitNumber)
		}
		return [4]int64{int64(bus[d.ControllerKey]), int64(d.ControllerKey), unit, int64(d.Key)}
	}
	sort.SliceStable(disks, func(i, j int) bool {
		a, b := order(disks[i]), order(disks[j])
		for k := range a {
			if a[k] != b[k] {
				return a[k] < b[k]
			}
		}
		return false
	})
	return disks
}

// rootBacking is the base of a backing chain.
func rootBacking(b *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	for i := 0; b.Parent != nil && i < 1024; i++ {
		b = b.Parent
	}
	return b
}

// datastoreDir is the host directory of a datastore ("" when there is none of that name).
func datastoreDir(name string) string {
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == name {
			return ds.Info.GetDatastoreInfo().Url
		}
	}
	return ""
}

// layoutOf reads disk n's extraConfig keys; the caller holds the VM's lock.
func layoutOf(vm *simulator.VirtualMachine, n int, mode string) diskLayout {
	lay := diskLayout{n: n, mode: mode, fs: "ext4", table: "gpt", format: "monolithicSparse"}
	lay.windows = vm.Config != nil && strings.HasPrefix(strings.ToLower(vm.Config.GuestId), "win")
	if lay.windows {
		lay.fs = "ntfs"
	}
	get := func(key string) (string, bool) { return extraConfigValue(vm, diskKey(n, key)) }
	if v, ok := get(DiskFSKey); ok && v != "" {
		lay.fs = strings.ToLower(v)
	}
	if v, ok := get(DiskLayoutKey); ok && v != "" {
		switch strings.ToLower(v) {
		case "lvm":
			if n == 1 {
				lay.lvm = true
			} else {
				// mkdisk names every volume group vg0: a second one would clash with disk 1's
				log.Printf("disk %d of %s: layout lvm is for disk 1 only; gpt used", n, vm.Name)
			}
		default:
			lay.table = strings.ToLower(v)
		}
	}
	if v, ok := get(DiskFormatKey); ok && v != "" {
		lay.format = v
	}
	if v, ok := get(DiskLUKSKey); ok {
		lay.luks = strings.EqualFold(v, "true")
	}
	switch {
	case lay.windows:
		if n <= 24 {
			lay.mount = string(rune('C' + n - 1))
		}
	case n == 1:
		lay.mount = "/"
	default:
		lay.mount = "/data"
		if n > 2 {
			lay.mount = fmt.Sprintf("/data%d", n)
		}
		if v, ok := get(DiskMountKey); ok && v != "" {
			if clean := path.Clean("/" + v); clean != "/" {
				lay.mount = clean
			}
		}
	}
	return lay
}

// diskTarget is one disk of a VM as a reconcile sees it.
type diskTarget struct {
	key int32
	d   *diskChain
	lay diskLayout
}

// readDiskSetup reads what the builds need from the VM (under its lock): its disks in guest
// order with their layouts, and each new disk's paths and whether the simulator builds it.
func readDiskSetup(vm *simulator.VirtualMachine, vd *vmDisk) ([]diskTarget, string, error) {
	var (
		targets []diskTarget
		name    string
		err     error
	)
	simulator.Map.WithLock(vm, func() {
		name = vm.Name
		disks := guestDisks(vm)
		if len(disks) == 0 {
			err = fmt.Errorf("VM %s has no virtual disk", vm.Name)
			return
		}
		present := map[int32]bool{}
		for i, disk := range disks {
			backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			present[disk.Key] = true
			d := vd.disks[disk.Key]
			if d == nil {
				var p object.DatastorePath
				if !p.FromString(rootBacking(backing).FileName) {
					err = fmt.Errorf("VM %s: cannot parse disk file name %q", vm.Name, backing.FileName)
					return
				}
				d = &diskChain{dsName: p.Datastore, dir: path.Dir(p.Path), base: path.Base(p.Path)}
				vd.disks[disk.Key] = d
			}
			targets = append(targets, diskTarget{key: disk.Key, d: d, lay: layoutOf(vm, i+1, backing.DiskMode)})
		}
		for key := range vd.disks {
			if !present[key] {
				delete(vd.disks, key) // removed from the VM
			}
		}
	})
	if err != nil {
		return nil, name, err
	}
	var places []diskPlace
	for _, t := range targets {
		if t.d.dsDir == "" {
			if t.d.dsDir = datastoreDir(t.d.dsName); t.d.dsDir == "" {
				return nil, name, fmt.Errorf("VM %s: datastore %s not found", name, t.d.dsName)
			}
			// The first disk is always built; another one only when its file is the
			// library's empty placeholder (a client's own VMDK stays as it is).
			st, serr := os.Stat(t.d.hostPath(0))
			t.d.owned = t.lay.n == 1 || serr != nil || st.Size() == 0
		}
		places = append(places, diskPlace{n: t.lay.n, dsName: t.d.dsName, dir: t.d.dir, base: t.d.base})
	}
	vmDisks.Lock()
	vmDisks.places[vm.Reference().Value] = places
	vmDisks.Unlock()
	return targets, name, nil
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
func (d *diskChain) buildElement(i int, src string, lay diskLayout) error {
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
func (d *diskChain) emptyDelta(i int) error {
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

// reconcileDisk brings the files of every disk the simulator builds in line with the VM's
// snapshot path and publishes the chains in the inventory. Independent disks are outside
// snapshots: they keep their single file (and independent_nonpersistent disks are never
// rebuilt after the first build).
func reconcileDisk(ref types.ManagedObjectReference, mode leafMode) {
	if !diskOpts.enabled {
		return
	}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	vd := diskOf(ref)
	vd.mu.Lock()
	defer vd.mu.Unlock()
	targets, name, err := readDiskSetup(vm, vd)
	if err != nil {
		log.Printf("disk: %s", err)
		return
	}
	var want []string
	simulator.Map.WithLock(vm, func() { want = snapshotPath(vm) })
	var others []diskLayout // disks whose trees disk 1 leaves out (its /etc/fstab mounts them)
	for _, t := range targets {
		if t.d.owned && t.lay.n > 1 {
			others = append(others, t.lay)
		}
	}
	for _, t := range targets {
		if t.d.owned {
			if err := t.d.reconcile(t.lay, want, mode, vmRootDir(name), others); err != nil {
				log.Printf("disk of %s: %s", name, err)
			}
		}
	}
	publishDisks(vm, vd)
}

// reconcile brings one disk's chain in line with the snapshot path want.
func (d *diskChain) reconcile(lay diskLayout, want []string, mode leafMode, live string, others []diskLayout) error {
	if strings.HasPrefix(lay.mode, "independent") {
		want = nil
		if d.built && (lay.mode == string(types.VirtualDiskModeIndependent_nonpersistent) || mode == leafEmpty) {
			return nil
		}
		mode = leafLive
	}
	keep := 0
	if d.built {
		for keep < len(want) && keep < len(d.chain) && want[keep] == d.chain[keep] {
			keep++
		}
	}
	build := func(i int, root string) error {
		src, done, err := diskTree(root, lay, others)
		if err == nil {
			err = d.buildElement(i, src, lay)
			done()
		}
		if err != nil {
			d.built = false
		}
		return err
	}
	for i := keep; i < len(want); i++ {
		if err := build(i, snapshotDir(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: want[i]})); err != nil {
			return err
		}
	}
	leaf := len(want)
	if mode == leafEmpty && leaf > 0 {
		if err := d.emptyDelta(leaf); err != nil {
			d.built = false
			return err
		}
	} else if err := build(leaf, live); err != nil {
		return err
	}
	// files deeper than the leaf belong to snapshots that are gone (they are consecutive)
	for i := leaf + 1; i < leaf+1+1024; i++ {
		if err := os.Remove(d.hostPath(i)); err != nil && os.IsNotExist(err) {
			break
		}
	}
	d.chain = want
	d.built = true
	return nil
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

// publishDisks sets each built disk's backing chain and capacity, and the VM's file layout
// (layoutEx) to the files of every disk, as a real vCenter reports them; the caller holds
// vd.mu. Disks the simulator does not build are listed as their backings name them.
func publishDisks(vm *simulator.VirtualMachine, vd *vmDisk) {
	sizes := map[int32]int64{}
	dsDirs := map[string]string{} // looked up before the VM's lock is taken
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok {
			dsDirs[ds.Name] = ds.Info.GetDatastoreInfo().Url
		}
	}
	for key, d := range vd.disks {
		if d.owned && d.built {
			sizes[key] = virtualSize(d.hostPath(0))
		}
	}
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil || vm.LayoutEx == nil {
			return
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
		// unit lists one chain element: its descriptor, and its -flat extent if there is one
		unit := func(dsName, dsDir, dsFile string) types.VirtualMachineFileLayoutExDiskUnit {
			var u types.VirtualMachineFileLayoutExDiskUnit
			names := []string{dsFile}
			flat := strings.TrimSuffix(dsFile, ".vmdk") + "-flat.vmdk"
			if st, err := os.Stat(filepath.Join(dsDir, flat)); err == nil && st.Size() > 0 {
				names = append(names, flat)
			}
			for j, n := range names {
				typ := types.VirtualMachineFileLayoutExFileTypeDiskDescriptor
				if j > 0 {
					typ = types.VirtualMachineFileLayoutExFileTypeDiskExtent
				}
				var sz int64
				if st, err := os.Stat(filepath.Join(dsDir, n)); err == nil {
					sz = st.Size()
				}
				files = append(files, types.VirtualMachineFileLayoutExFileInfo{
					Key: key, Name: fmt.Sprintf("[%s] %s", dsName, n), Type: string(typ), Size: sz,
					UniqueSize: sz, Accessible: types.NewBool(true),
				})
				u.FileKey = append(u.FileKey, key)
				key++
			}
			return u
		}
		layout := *vm.LayoutEx
		layout.Disk = nil
		chains := map[int32][]types.VirtualMachineFileLayoutExDiskUnit{} // built disks, base first
		for _, disk := range guestDisks(vm) {
			d := vd.disks[disk.Key]
			var units []types.VirtualMachineFileLayoutExDiskUnit
			if d != nil && d.owned && d.built {
				old := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				var chain *types.VirtualDiskFlatVer2BackingInfo
				for i := 0; i <= len(d.chain); i++ {
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
					units = append(units, unit(d.dsName, d.dsDir, path.Join(d.dir, d.fileName(i))))
				}
				disk.Backing = chain
				if size := sizes[disk.Key]; size > 0 {
					disk.CapacityInBytes = size
					disk.CapacityInKB = size / 1024
				}
				chains[disk.Key] = units
			} else {
				// as the backing names it: base first, as layoutEx lists a chain
				var levels []string
				b := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				for i := 0; b != nil && i < 1024; i++ {
					levels = append([]string{b.FileName}, levels...)
					b = b.Parent
				}
				for _, name := range levels {
					var p object.DatastorePath
					if p.FromString(name) {
						units = append(units, unit(p.Datastore, dsDirs[p.Datastore], p.Path))
					}
				}
			}
			layout.Disk = append(layout.Disk, types.VirtualMachineFileLayoutExDiskLayout{Key: disk.Key, Chain: units})
		}
		layout.File = files
		var snaps []types.VirtualMachineFileLayoutExSnapshotLayout
		for _, s := range layout.Snapshot {
			var disks []types.VirtualMachineFileLayoutExDiskLayout
			for _, old := range s.Disk {
				if _, rebuilt := chains[old.Key]; !rebuilt {
					disks = append(disks, old) // a disk the simulator does not build
				}
			}
			for _, disk := range guestDisks(vm) {
				units, ok := chains[disk.Key]
				if !ok {
					continue
				}
				idx := -1
				for i, v := range vd.disks[disk.Key].chain {
					if v == s.Key.Value {
						idx = i
					}
				}
				if idx >= 0 {
					disks = append(disks, types.VirtualMachineFileLayoutExDiskLayout{Key: disk.Key, Chain: units[:idx+1]})
				} else {
					for _, old := range s.Disk {
						if old.Key == disk.Key {
							disks = append(disks, old) // not on the current path: as listed before
						}
					}
				}
			}
			s.Disk = disks
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
// are marked inaccessible (vcsim.disk.inaccessible = TRUE: every file of the VM) or to a
// disk n > 1 marked so (vcsim.disk<n>.inaccessible = TRUE: that disk's files).
func diskInaccessible(dsName, rel string) bool {
	clean := path.Clean("/" + rel)
	dir, file := path.Dir(clean), path.Base(clean)
	type match struct {
		ref string
		n   int // 0: a file of the VM's directory that is no disk of this one
	}
	vmDisks.Lock()
	var found []match
	for ref, places := range vmDisks.places {
		for _, p := range places {
			if p.dsName != dsName || "/"+p.dir != dir {
				continue
			}
			n := 0
			if diskFileOf(p.base, file) {
				n = p.n
			}
			found = append(found, match{ref, n})
		}
	}
	vmDisks.Unlock()
	for _, m := range found {
		vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: m.ref}).(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		bad := false
		simulator.Map.WithLock(vm, func() {
			v, _ := extraConfigValue(vm, DiskInaccessibleKey)
			bad = strings.EqualFold(v, "true")
			if m.n > 1 {
				v, _ = extraConfigValue(vm, diskKey(m.n, DiskInaccessibleKey))
				bad = bad || strings.EqualFold(v, "true")
			}
		})
		if bad {
			return true
		}
	}
	return false
}

// diskFileOf reports whether file is one of the chain files of the disk whose element 0 is
// base (base, its -flat extent, its -00000N deltas).
func diskFileOf(base, file string) bool {
	stem := strings.TrimSuffix(base, ".vmdk")
	if file == base || file == stem+"-flat.vmdk" {
		return true
	}
	rest := strings.TrimSuffix(strings.TrimPrefix(file, stem+"-"), ".vmdk")
	if len(rest) != 6 || !strings.HasPrefix(file, stem+"-") || !strings.HasSuffix(file, ".vmdk") {
		return false
	}
	_, err := strconv.Atoi(rest)
	return err == nil
}

// addsOrRemovesDisk reports whether a ReconfigVM_Task spec adds or removes a VirtualDisk.
func addsOrRemovesDisk(req *types.ReconfigVM_Task) bool {
	for _, change := range req.Spec.DeviceChange {
		spec := change.GetVirtualDeviceConfigSpec()
		if _, ok := spec.Device.(*types.VirtualDisk); ok && spec.Operation != types.VirtualDeviceConfigSpecOperationEdit {
			return true
		}
	}
	return false
}

// afterDiskChange rebuilds the VM's disks once ReconfigVM_Task added or removed one: the
// trees the disks hold change with the set of disks (disk 1 leaves out the new disk's
// mount point, the new disk holds that subtree).
func afterDiskChange(req *types.ReconfigVM_Task) func([]byte) {
	if !diskOpts.enabled || !addsOrRemovesDisk(req) {
		return nil
	}
	return func(response []byte) {
		if succeeded(response) {
			reconcileDisk(req.This, leafLive)
		}
	}
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
	vd := diskOf(req.This)
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
		vd.mu.Lock()
		dsDir := ""
		for _, d := range vd.disks {
			if d.built {
				var p object.DatastorePath
				if p.FromString(b.FileName) && p.Datastore == d.dsName {
					dsDir = d.dsDir
				}
			}
		}
		if dsDir != "" {
			var p object.DatastorePath
			p.FromString(b.FileName)
			flat := filepath.Join(dsDir, strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk")
			if _, err := os.Stat(flat); os.IsNotExist(err) {
				if f, cerr := os.OpenFile(flat, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); cerr == nil {
					_ = f.Close()
					placeholders = append(placeholders, flat)
				}
			}
		}
		vd.mu.Unlock()
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
	vd := diskOf(ref)
	vd.mu.Lock()
	defer vd.mu.Unlock()
	if _, _, err := readDiskSetup(vm, vd); err != nil {
		return
	}
	publishDisks(vm, vd)
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
