package main

// Snapshots that mean something: CreateSnapshot_Task also records the VM's guest file tree
// (under <guest-root>/.snapshots/<snapshot moref>) and power state; RevertToSnapshot_Task and
// RevertToCurrentSnapshot_Task restore both (power on only unless suppressPowerOn), make the
// snapshot current and post EventEx com.vmware.vc.vm.VmStateRevertedToSnapshot, as a real
// vCenter does. Removing a snapshot removes its recorded tree.

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// RevertedEventTypeID is the EventEx type a real vCenter logs after a snapshot revert.
const RevertedEventTypeID = "com.vmware.vc.vm.VmStateRevertedToSnapshot"

var snapshots = struct {
	sync.Mutex
	power map[string]types.VirtualMachinePowerState // snapshot moref value -> power state
	name  map[string]string                         // snapshot moref value -> snapshot name
}{power: map[string]types.VirtualMachinePowerState{}, name: map[string]string{}}

func snapshotDir(snapshot types.ManagedObjectReference) string {
	return filepath.Join(opts.GuestRoot, ".snapshots", filepath.Base(snapshot.Value))
}

func afterCreateSnapshot(req *types.CreateSnapshot_Task) func([]byte) {
	return func(response []byte) {
		_, res := taskResult(response)
		snap, ok := res.(types.ManagedObjectReference)
		if !ok {
			return
		}
		vm, p := placementOf(req.This)
		if vm == nil {
			return
		}
		dir := snapshotDir(snap)
		_ = os.RemoveAll(dir)
		if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
			log.Printf("snapshot %s: %s", snap.Value, err)
			return
		}
		src := vmRootDir(p.name)
		if _, err := os.Stat(src); err == nil {
			if err = copyTree(src, dir); err != nil {
				log.Printf("snapshot %s of %s: copying the guest tree: %s", snap.Value, p.name, err)
			}
		} else if err = os.MkdirAll(dir, 0o700); err != nil {
			log.Printf("snapshot %s: %s", snap.Value, err)
		}
		snapshots.Lock()
		snapshots.power[snap.Value] = p.power
		snapshots.name[snap.Value] = req.Name
		snapshots.Unlock()
	}
}

func afterRevertToSnapshot(req *types.RevertToSnapshot_Task, user string) func([]byte) {
	return func(response []byte) {
		task := finishedTask(response)
		renameTask(task, "RevertToSnapshot_Task", "vm.Snapshot.revert")
		retargetTask(task, req.This)
		if !succeeded(response) {
			return
		}
		snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return
		}
		var vmRef types.ManagedObjectReference
		simulator.Map.WithLock(snap, func() { vmRef = snap.Vm })
		revert(vmRef, req.This, req.SuppressPowerOn != nil && *req.SuppressPowerOn, user)
	}
}

func afterRevertToCurrentSnapshot(req *types.RevertToCurrentSnapshot_Task, user string) func([]byte) {
	var current *types.ManagedObjectReference
	if vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine); ok {
		simulator.Map.WithLock(vm, func() {
			if vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
				c := *vm.Snapshot.CurrentSnapshot
				current = &c
			}
		})
	}
	return func(response []byte) {
		task := finishedTask(response)
		renameTask(task, "RevertToCurrentSnapshot_Task", "VirtualMachine.revertToCurrentSnapshot")
		if current == nil || !succeeded(response) {
			return
		}
		revert(req.This, *current, req.SuppressPowerOn != nil && *req.SuppressPowerOn, user)
	}
}

// revert restores a VM's guest tree and power state from a snapshot and logs the event.
func revert(vmRef, snap types.ManagedObjectReference, suppressPowerOn bool, user string) {
	vm, p := placementOf(vmRef)
	if vm == nil {
		return
	}
	snapshots.Lock()
	want, known := snapshots.power[snap.Value]
	name := snapshots.name[snap.Value]
	snapshots.Unlock()
	if !known {
		want = types.VirtualMachinePowerStatePoweredOff
	}
	if suppressPowerOn && want != types.VirtualMachinePowerStatePoweredOff {
		want = types.VirtualMachinePowerStatePoweredOff
	}

	// A revert that changes the power state stops the guest first, so the tree is replaced
	// while the VM is off; a running VM reverted to a running snapshot keeps running.
	if p.power != types.VirtualMachinePowerStatePoweredOff && want != p.power {
		setPowerState(vm, types.VirtualMachinePowerStatePoweredOff, user)
	}
	if err := restoreTree(snap, p.name); err != nil {
		log.Printf("revert %s to %s: %s", p.name, snap.Value, err)
	}
	setPowerState(vm, want, user)

	simulator.Map.WithLock(vm, func() {
		s := snap
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot.currentSnapshot", Val: &s}})
	})
	postReverted(vm, name, user)
}

// restoreTree replaces the VM's guest tree with the snapshot's copy.
func restoreTree(snap types.ManagedObjectReference, vmName string) error {
	src := snapshotDir(snap)
	if _, err := os.Stat(src); err != nil {
		return fmt.Errorf("no recorded guest tree for snapshot %s", snap.Value)
	}
	dst := vmRootDir(vmName)
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	return copyTree(src, dst)
}

func postReverted(vm *simulator.VirtualMachine, snapshotName, user string) {
	ev := &types.EventEx{
		EventTypeId: RevertedEventTypeID,
		Severity:    "info",
		Message:     "",
		ObjectType:  "VirtualMachine",
	}
	simulator.Map.WithLock(vm, func() {
		ev.Event = entityEvent(vm)
		ev.ObjectId = vm.Self.Value
		ev.ObjectName = vm.Name
		ev.FullFormattedMessage = fmt.Sprintf("The virtual machine %s has been reverted to the state of snapshot %s", vm.Name, snapshotName)
	})
	ev.Arguments = []types.KeyAnyValue{{Key: "snapshotName", Value: snapshotName}}
	postEventEx(ev, user)
}

// entityEvent fills the Vm/Host/ComputeResource/Datacenter arguments of an event about a VM;
// the caller holds the VM's lock.
func entityEvent(vm *simulator.VirtualMachine) types.Event {
	ev := types.Event{
		Vm: &types.VmEventArgument{
			EntityEventArgument: types.EntityEventArgument{Name: vm.Name},
			Vm:                  vm.Self,
		},
	}
	if vm.Runtime.Host == nil {
		return ev
	}
	host, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
	if !ok {
		return ev
	}
	ev.Host = &types.HostEventArgument{
		EntityEventArgument: types.EntityEventArgument{Name: host.Name},
		Host:                host.Self,
	}
	for ref, i := host.Parent, 0; ref != nil && i < 64; i++ {
		obj := simulator.Map.Get(*ref)
		switch x := obj.(type) {
		case *simulator.ClusterComputeResource:
			ev.ComputeResource = &types.ComputeResourceEventArgument{
				EntityEventArgument: types.EntityEventArgument{Name: x.Name},
				ComputeResource:     x.Self,
			}
		case *simulator.Datacenter:
			ev.Datacenter = &types.DatacenterEventArgument{
				EntityEventArgument: types.EntityEventArgument{Name: x.Name},
				Datacenter:          x.Self,
			}
			return ev
		}
		e, isEntity := obj.(mo.Entity)
		if !isEntity {
			return ev
		}
		ref = e.Entity().Parent
	}
	return ev
}

func afterRemoveSnapshot(req *types.RemoveSnapshot_Task) func([]byte) {
	// The snapshot is gone after the call: find its VM first.
	var vmRef types.ManagedObjectReference
	if snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot); ok {
		simulator.Map.WithLock(snap, func() { vmRef = snap.Vm })
	}
	// Children removed with it keep their trees until RemoveAllSnapshots; they are small.
	return func(response []byte) {
		if task := finishedTask(response); task != nil && vmRef.Value != "" {
			_, p := placementOf(vmRef)
			simulator.Map.WithLock(task, func() {
				simulator.Map.Update(task, []types.PropertyChange{
					{Name: "info.entity", Val: &vmRef},
					{Name: "info.entityName", Val: p.name},
				})
			})
		}
		if !succeeded(response) {
			return
		}
		forgetSnapshot(req.This.Value)
	}
}

func afterRemoveAllSnapshots(req *types.RemoveAllSnapshots_Task) func([]byte) {
	var refs []types.ManagedObjectReference
	if vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine); ok {
		simulator.Map.WithLock(vm, func() {
			if vm.Snapshot != nil {
				refs = snapshotRefs(vm.Snapshot.RootSnapshotList, 0)
			}
		})
	}
	return func(response []byte) {
		if !succeeded(response) {
			return
		}
		for _, ref := range refs {
			forgetSnapshot(ref.Value)
		}
	}
}

func snapshotRefs(trees []types.VirtualMachineSnapshotTree, depth int) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	if depth > 256 {
		return out
	}
	for _, t := range trees {
		out = append(out, t.Snapshot)
		out = append(out, snapshotRefs(t.ChildSnapshotList, depth+1)...)
	}
	return out
}

func forgetSnapshot(value string) {
	snapshots.Lock()
	delete(snapshots.power, value)
	delete(snapshots.name, value)
	snapshots.Unlock()
	_ = os.RemoveAll(snapshotDir(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: value}))
}
