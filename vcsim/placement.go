package main

// Placement, as a real vCenter does it: CloneVM_Task puts the clone on spec.location.host (or
// on a host of spec.location.pool's cluster), copies the source's guest file tree and honours
// spec.powerOn; RelocateVM_Task and MigrateVM_Task keep every host's, pool's and datastore's
// `vm` list and the VM's runtime.host right (the library leaves the VM on its old host's
// list and never adds it to the new one).

import (
	"log"
	"os"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

func refsWithout(refs []types.ManagedObjectReference, ref types.ManagedObjectReference) []types.ManagedObjectReference {
	out := make([]types.ManagedObjectReference, 0, len(refs))
	for _, r := range refs {
		if r != ref {
			out = append(out, r)
		}
	}
	return out
}

func refsWith(refs []types.ManagedObjectReference, ref types.ManagedObjectReference) []types.ManagedObjectReference {
	for _, r := range refs {
		if r == ref {
			return refs
		}
	}
	out := make([]types.ManagedObjectReference, 0, len(refs)+1)
	out = append(out, refs...)
	return append(out, ref)
}

// editVMList removes vm from the `vm` list of one inventory object and/or adds it to another.
func editVMList(obj types.ManagedObjectReference, vm types.ManagedObjectReference, add bool) {
	o := simulator.Map.Get(obj)
	if o == nil {
		return
	}
	simulator.Map.WithLock(o, func() {
		var list *[]types.ManagedObjectReference
		switch x := o.(type) {
		case *simulator.HostSystem:
			list = &x.Vm
		case *simulator.ResourcePool:
			list = &x.Vm
		case *simulator.Datastore:
			list = &x.Vm
		default:
			return
		}
		next := refsWithout(*list, vm)
		if add {
			next = refsWith(*list, vm)
		}
		if len(next) == len(*list) {
			return
		}
		simulator.Map.Update(o, []types.PropertyChange{{Name: "vm", Val: next}})
	})
}

// hostsOfPool returns the hosts of the compute resource that owns a resource pool.
func hostsOfPool(pool types.ManagedObjectReference) []types.ManagedObjectReference {
	ref := pool
	for i := 0; i < 64; i++ { // bounded walk up the inventory
		obj := simulator.Map.Get(ref)
		if obj == nil {
			return nil
		}
		switch x := obj.(type) {
		case *simulator.ClusterComputeResource:
			return append([]types.ManagedObjectReference(nil), x.Host...)
		case *mo.ComputeResource:
			return append([]types.ManagedObjectReference(nil), x.Host...)
		}
		e, ok := obj.(mo.Entity)
		if !ok || e.Entity().Parent == nil {
			return nil
		}
		ref = *e.Entity().Parent
	}
	return nil
}

// pickHost chooses the host of a pool's cluster with the fewest VMs, keeping current if it
// already belongs to the cluster.
func pickHost(pool types.ManagedObjectReference, current *types.ManagedObjectReference) *types.ManagedObjectReference {
	hosts := hostsOfPool(pool)
	if len(hosts) == 0 {
		return nil
	}
	if current != nil {
		for _, h := range hosts {
			if h == *current {
				return current
			}
		}
	}
	best := hosts[0]
	bestCount := -1
	for _, h := range hosts {
		host, ok := simulator.Map.Get(h).(*simulator.HostSystem)
		if !ok {
			continue
		}
		n := 0
		simulator.Map.WithLock(host, func() { n = len(host.Vm) })
		if bestCount < 0 || n < bestCount {
			best, bestCount = h, n
		}
	}
	return &best
}

// vmPlacement is where a VM is, read under its lock.
type vmPlacement struct {
	name      string
	host      *types.ManagedObjectReference
	pool      *types.ManagedObjectReference
	datastore []types.ManagedObjectReference
	power     types.VirtualMachinePowerState
	template  bool
}

func placementOf(ref types.ManagedObjectReference) (*simulator.VirtualMachine, vmPlacement) {
	var p vmPlacement
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, p
	}
	simulator.Map.WithLock(vm, func() {
		p.name = vm.Name
		if vm.Runtime.Host != nil {
			h := *vm.Runtime.Host
			p.host = &h
		}
		if vm.ResourcePool != nil {
			rp := *vm.ResourcePool
			p.pool = &rp
		}
		p.datastore = append(p.datastore, vm.Datastore...)
		p.power = vm.Runtime.PowerState
		p.template = vm.Config != nil && vm.Config.Template
	})
	return vm, p
}

// moveToHost puts a VM on a host: host lists, runtime.host and summary.runtime.host.
func moveToHost(ref types.ManagedObjectReference, from *types.ManagedObjectReference, to types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	if from != nil && *from != to {
		editVMList(*from, ref, false)
	}
	editVMList(to, ref, true)
	simulator.Map.WithLock(vm, func() {
		host := to
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.host", Val: &host},
			{Name: "summary.runtime.host", Val: &host},
		})
	})
}

// afterRelocate fixes the lists after RelocateVM_Task (or MigrateVM_Task, then renamed).
func afterRelocate(ref types.ManagedObjectReference, spec types.VirtualMachineRelocateSpec, taskName, descriptionID string) func([]byte) {
	_, before := placementOf(ref)
	return func(response []byte) {
		task := finishedTask(response)
		if taskName != "" {
			renameTask(task, taskName, descriptionID)
		}
		if !succeeded(response) {
			return
		}
		target := spec.Host
		if target == nil && spec.Pool != nil {
			target = pickHost(*spec.Pool, before.host)
		}
		if target != nil {
			moveToHost(ref, before.host, *target)
		}
		if spec.Pool != nil && (before.pool == nil || *before.pool != *spec.Pool) {
			if before.pool != nil {
				editVMList(*before.pool, ref, false)
			}
			editVMList(*spec.Pool, ref, true)
		}
		if spec.Datastore != nil {
			for _, ds := range before.datastore {
				if ds != *spec.Datastore {
					editVMList(ds, ref, false)
				}
			}
			editVMList(*spec.Datastore, ref, true)
		}
	}
}

// afterClone places the clone, copies the guest tree and powers it on if asked.
func afterClone(req *types.CloneVM_Task, user string) func([]byte) {
	_, source := placementOf(req.This)
	return func(response []byte) {
		_, res := taskResult(response)
		cloneRef, ok := res.(types.ManagedObjectReference)
		if !ok {
			return
		}
		clone, now := placementOf(cloneRef)
		if clone == nil {
			return
		}
		target := req.Spec.Location.Host
		if target == nil && req.Spec.Location.Pool != nil {
			target = pickHost(*req.Spec.Location.Pool, now.host)
		}
		if target != nil && (now.host == nil || *now.host != *target) {
			moveToHost(cloneRef, now.host, *target)
		}
		if source.name != "" {
			src := vmRootDir(source.name)
			if _, err := os.Stat(src); err == nil {
				if err = copyTree(src, vmRootDir(now.name)); err != nil {
					log.Printf("clone %s: copying the guest tree of %s: %s", now.name, source.name, err)
				}
			}
		}
		if req.Spec.PowerOn && !now.template && !req.Spec.Template {
			setPowerState(clone, types.VirtualMachinePowerStatePoweredOn, user)
		}
	}
}

// setPowerState drives a VM to a power state through the same tasks as a client's request
// (powerOn for power-ons, the library's for the rest), so events, tools status, vNICs and
// properties follow as for a client's request.
func setPowerState(vm *simulator.VirtualMachine, want types.VirtualMachinePowerState, user string) {
	ctx := internalCtx(user)
	simulator.Map.WithLock(vm, func() {
		have := vm.Runtime.PowerState
		if have == want {
			return
		}
		switch want {
		case types.VirtualMachinePowerStatePoweredOn:
			powerOn(vm, user)
		case types.VirtualMachinePowerStatePoweredOff:
			vm.PowerOffVMTask(ctx, &types.PowerOffVM_Task{This: vm.Self})
		case types.VirtualMachinePowerStateSuspended:
			if have == types.VirtualMachinePowerStatePoweredOff {
				powerOn(vm, user)
			}
			vm.SuspendVMTask(ctx, &types.SuspendVM_Task{This: vm.Self})
		}
	})
}
