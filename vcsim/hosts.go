package main

// Every host reports a management address, as a real ESXi host does with its management
// vmknic (vmk0 on "Management Network"): on the simulator it is the simulator's own listen
// address, which clients put in place of `*` in guest file transfer URLs.

import (
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func installHosts() {
	for _, e := range simulator.Map.All("HostSystem") {
		host, ok := e.(*simulator.HostSystem)
		if !ok {
			continue
		}
		simulator.Map.WithLock(host, func() { setManagementAddress(host) })
	}
}

// setManagementAddress points the host's vmk0 at listenIP; the caller holds the host's lock.
func setManagementAddress(host *simulator.HostSystem) {
	if host.Config == nil || host.Config.Network == nil {
		return
	}
	vnics := make([]types.HostVirtualNic, 0, len(host.Config.Network.Vnic))
	for _, nic := range host.Config.Network.Vnic {
		vnics = append(vnics, nic)
	}
	if len(vnics) == 0 {
		vnics = append(vnics, types.HostVirtualNic{Device: "vmk0", Key: "key-vim.host.VirtualNic-vmk0"})
	}
	mgmt := vnics[0]
	mgmt.Device = "vmk0"
	mgmt.Portgroup = "Management Network"
	if mgmt.Spec.Ip == nil {
		mgmt.Spec.Ip = &types.HostIpConfig{}
	} else {
		ipc := *mgmt.Spec.Ip
		mgmt.Spec.Ip = &ipc
	}
	mgmt.Spec.Ip.IpAddress = listenIP
	mgmt.Spec.Ip.SubnetMask = "255.0.0.0"
	mgmt.Spec.Portgroup = "Management Network"
	vnics[0] = mgmt
	simulator.Map.Update(host, []types.PropertyChange{
		{Name: "config.network.vnic", Val: vnics},
		{Name: "summary.managementServerIp", Val: listenIP},
	})
}
