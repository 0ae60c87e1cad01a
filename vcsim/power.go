package main

// Power-on as ESXi does it, for the two facts instant-on containment depends on:
//
//   - A vNIC is connected only while its VM runs. A powered-off VM reports every
//     `connectable.connected = false`; at power-on ESXi connects the vNICs whose
//     `startConnected` is true; at power-off they report disconnected again ("connected:
//     Indicates whether the device is currently connected. Valid only while the virtual
//     machine is running", vSphere API reference, VirtualDeviceConnectInfo). The library
//     leaves `connected` as it was created or last edited.
//   - `VmStartingEvent` is logged when the power-on begins, before the power state changes,
//     and `VmPoweredOnEvent` once the VM runs. The library posts both before it changes the
//     power state. PowerOnVM_Task of a logged-in client (and our own power-ons: clones with
//     powerOn, reverts) are therefore run here: Starting event, power state (and NICs),
//     PoweredOn event, in that order, in a library Task so clients wait on it as usual.

import (
	"net/http/httptest"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// nicWatcher observes the registry and keeps every vNIC's `connected` in line with its VM's
// power state.
type nicWatcher struct {
	self types.ManagedObjectReference
}

func (n *nicWatcher) Reference() types.ManagedObjectReference { return n.self }

func (n *nicWatcher) PutObject(mo.Reference) {}

func (n *nicWatcher) RemoveObject(types.ManagedObjectReference) {}

// UpdateObject runs in the goroutine that changed the VM, which holds the VM's lock (as for
// toolsWatcher). A power state change sets `connected` for power-on or power-off; any
// other change of a VM that is not running keeps its vNICs disconnected.
func (n *nicWatcher) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	if _, ok := obj.(*mo.VirtualMachine); !ok {
		return
	}
	powered := false
	for _, ch := range changes {
		if ch.Name == "runtime.powerState" {
			powered = true
		}
	}
	syncNics(obj.Reference(), powered)
}

func installNics() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		ref := e.Reference()
		if vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine); ok {
			simulator.Map.WithLock(vm, func() { syncNics(ref, false) })
		}
	}
	simulator.Map.AddHandler(&nicWatcher{self: types.ManagedObjectReference{Type: "VcsimNicWatcher", Value: "nic-watcher"}})
}

// syncNics sets the vNICs' `connected` flags from the power state: at a power-on
// (poweredOn just set) to `startConnected`, while not running to false. The caller holds
// the VM's lock.
func syncNics(ref types.ManagedObjectReference, powerChanged bool) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	running := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
	if running && !powerChanged {
		return // while running, connected is the client's to change
	}
	devices := vm.Config.Hardware.Device
	changed := false
	for _, d := range devices {
		if _, nic := d.(types.BaseVirtualEthernetCard); !nic {
			continue
		}
		c := d.GetVirtualDevice().Connectable
		if c == nil {
			continue
		}
		want := running && c.StartConnected
		if c.Connected != want {
			c.Connected = want
			changed = true
		}
	}
	if changed {
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: []types.BaseVirtualDevice(devices)},
		})
	}
}

// powerOn runs a power-on of vm (not a template) as ESXi orders it and returns the finished
// task, which holds InvalidPowerState if the VM was on already; the caller holds the VM's
// lock.
func powerOn(vm *simulator.VirtualMachine, user string) types.ManagedObjectReference {
	task := simulator.CreateTask(vm, "powerOn", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
			return nil, &types.InvalidPowerState{
				RequestedState: types.VirtualMachinePowerStatePoweredOn,
				ExistingState:  vm.Runtime.PowerState,
			}
		}
		postVMEvent(&types.VmStartingEvent{VmEvent: types.VmEvent{Event: entityEvent(vm)}}, user)
		boot := time.Now()
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOn},
			{Name: "summary.runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOn},
			{Name: "summary.runtime.bootTime", Val: boot},
		})
		postVMEvent(&types.VmPoweredOnEvent{VmEvent: types.VmEvent{Event: entityEvent(vm)}}, user)
		return nil, nil
	})
	return task.Run()
}

// postVMEvent posts a plain (non-EventEx) event; the caller may hold the VM's lock (the
// library posts its own VM events the same way).
func postVMEvent(ev types.BaseEvent, user string) {
	em := simulator.Map.EventManager()
	ctx := internalCtx(user)
	simulator.Map.WithLock(em, func() {
		em.PostEvent(ctx, &types.PostEvent{This: em.Self, EventToPost: ev})
	})
}

// powerOnCall serves a logged-in client's PowerOnVM_Task; anything else (no session we
// know, not a VM) goes to the library, which answers as it does.
func (f *front) powerOnCall(c *soapCall, req *types.PowerOnVM_Task) *httptest.ResponseRecorder {
	cookie, err := c.r.Cookie(soap.SessionCookieName)
	if err != nil {
		return f.pass(c, c.body)
	}
	if _, known := sessionUsers.Load(cookie.Value); !known {
		return f.pass(c, c.body)
	}
	vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		return f.pass(c, c.body)
	}
	user := userOf(c.r)
	var ref types.ManagedObjectReference
	template := false
	simulator.Map.WithLock(vm, func() {
		template = vm.Config != nil && vm.Config.Template
		if !template {
			ref = powerOn(vm, user)
		}
	})
	if template {
		return f.pass(c, c.body) // the library's InvalidState fault
	}
	return soapResponse(&methods.PowerOnVM_TaskBody{Res: &types.PowerOnVM_TaskResponse{Returnval: ref}})
}
