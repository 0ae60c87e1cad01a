package main

// VMware Tools status that follows power state, as on a real vCenter: running (toolsOk) while
// a VM is powered on, not running otherwise. The documented extraConfig key
// `vcsim.tools.disabled = TRUE` (set with ReconfigVM_Task) keeps a VM's tools not running, so
// GuestOperationsUnavailable can be tested. Changes go through Map.Update so that clients in
// WaitForUpdatesEx see them; an observer registered with Map.AddHandler reacts to every
// property change of a VM (power operations, creation, clones).

import (
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// ToolsDisabledKey is the extraConfig key that keeps a VM's tools "not running".
const ToolsDisabledKey = "vcsim.tools.disabled"

// GuestIPKey is the extraConfig key (an OVF property on real appliances) whose address the
// guest applies at boot; while its tools run, the VM reports it as guest.ipAddress.
const GuestIPKey = "guestinfo.ipaddress"

// toolsVersion is what a current open-vm-tools reports.
const toolsVersion = "12352"

// toolsWatcher observes the registry and keeps every VM's tools status consistent.
type toolsWatcher struct {
	self types.ManagedObjectReference
}

func (t *toolsWatcher) Reference() types.ManagedObjectReference { return t.self }

func (t *toolsWatcher) PutObject(mo.Reference) {}

func (t *toolsWatcher) RemoveObject(types.ManagedObjectReference) {}

// UpdateObject runs in the goroutine that changed the VM, which holds the VM's lock (or
// owns a VM nobody else sees yet), so it may read and update the VM without locking.
func (t *toolsWatcher) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	if _, ok := obj.(*mo.VirtualMachine); !ok {
		return
	}
	for _, ch := range changes {
		if !strings.HasPrefix(ch.Name, "guest.") && !strings.HasPrefix(ch.Name, "summary.guest") {
			syncTools(obj.Reference())
			return
		}
	}
}

func installTools() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		syncToolsLocked(e.Reference())
	}
	simulator.Map.AddHandler(&toolsWatcher{self: types.ManagedObjectReference{Type: "VcsimToolsWatcher", Value: "tools-watcher"}})
}

// extraConfigValue returns the last value set for key (ReconfigVM_Task appends).
func extraConfigValue(vm *simulator.VirtualMachine, key string) (string, bool) {
	if vm.Config == nil {
		return "", false
	}
	value, found := "", false
	for _, o := range vm.Config.ExtraConfig {
		v := o.GetOptionValue()
		if v.Key == key {
			value, _ = v.Value.(string)
			found = true
		}
	}
	return strings.TrimSpace(value), found
}

// toolsDisabled reports whether the VM's extraConfig keeps its tools not running (the last
// value set for the key wins, as ReconfigVM_Task appends).
func toolsDisabled(vm *simulator.VirtualMachine) bool {
	v, _ := extraConfigValue(vm, ToolsDisabledKey)
	return strings.EqualFold(v, "true")
}

// toolsRunning reports whether guest operations can reach the VM's tools right now.
func toolsRunning(vm *simulator.VirtualMachine) bool {
	return vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn && !toolsDisabled(vm)
}

// syncToolsLocked takes the VM's lock and brings its tools status in line.
func syncToolsLocked(ref types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	simulator.Map.WithLock(vm, func() { syncTools(ref) })
}

// syncTools updates the tools properties of a VM if they disagree with its state; the
// caller holds the VM's lock.
func syncTools(ref types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok || vm.Guest == nil || vm.Config == nil {
		return // still being created: the final update of the creation brings us back
	}
	running := toolsRunning(vm)
	runStatus := string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
	status := types.VirtualMachineToolsStatusToolsNotRunning
	state := "notRunning"
	if running {
		runStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		status = types.VirtualMachineToolsStatusToolsOk
		state = "running"
	}
	syncGuestIP(vm, running)
	ready := vm.Guest.GuestOperationsReady
	if vm.Guest.ToolsRunningStatus == runStatus && vm.Guest.ToolsStatus == status &&
		vm.Guest.GuestState == state && ready != nil && *ready == running &&
		vm.Summary.Guest != nil && vm.Summary.Guest.ToolsRunningStatus == runStatus {
		return
	}
	changes := []types.PropertyChange{
		{Name: "guest.toolsRunningStatus", Val: runStatus},
		{Name: "guest.toolsStatus", Val: status},
		{Name: "guest.toolsVersion", Val: toolsVersion},
		{Name: "guest.toolsVersionStatus", Val: "guestToolsCurrent"},
		{Name: "guest.toolsVersionStatus2", Val: "guestToolsCurrent"},
		{Name: "guest.guestState", Val: state},
		{Name: "guest.guestOperationsReady", Val: running},
		{Name: "guest.interactiveGuestOperationsReady", Val: false},
		{Name: "guest.guestStateChangeSupported", Val: running},
	}
	changes = append(changes,
		types.PropertyChange{Name: "summary.guest.toolsRunningStatus", Val: runStatus},
		types.PropertyChange{Name: "summary.guest.toolsStatus", Val: status},
		types.PropertyChange{Name: "summary.guest.toolsVersionStatus", Val: "guestToolsCurrent"},
		types.PropertyChange{Name: "summary.guest.toolsVersionStatus2", Val: "guestToolsCurrent"},
	)
	simulator.Map.Update(vm, changes)
}

// syncGuestIP reports guestinfo.ipaddress as the guest's address while its tools run (as an
// appliance applying the property at boot would), and no address otherwise.
func syncGuestIP(vm *simulator.VirtualMachine, running bool) {
	ip, configured := extraConfigValue(vm, GuestIPKey)
	if !configured {
		return
	}
	if !running {
		ip = ""
	}
	if vm.Guest.IpAddress == ip {
		return
	}
	changes := []types.PropertyChange{
		{Name: "guest.ipAddress", Val: ip},
		{Name: "summary.guest.ipAddress", Val: ip},
	}
	if len(vm.Guest.Net) > 0 {
		nets := append([]types.GuestNicInfo(nil), vm.Guest.Net...)
		nets[0].IpAddress = nil
		if ip != "" {
			nets[0].IpAddress = []string{ip}
		}
		changes = append(changes, types.PropertyChange{Name: "guest.net", Val: nets})
	}
	simulator.Map.Update(vm, changes)
}
