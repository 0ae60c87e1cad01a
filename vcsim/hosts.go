package main

// A host added to a cluster (AddHost_Task) mounts the cluster's datastores and joins the
// distributed switches its peers are members of, as a prepared host would (the library leaves
// it without datastores, and a cluster with a host outside the DVS refuses every new VM).
//
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

// afterAddHost mounts the cluster's datastores on a newly added host and gives it the
// simulator's management address.
func afterAddHost(req *types.AddHost_Task) func([]byte) {
	return func(response []byte) {
		_, res := taskResult(response)
		ref, ok := res.(types.ManagedObjectReference)
		if !ok {
			return
		}
		host, ok := simulator.Map.Get(ref).(*simulator.HostSystem)
		if !ok {
			return
		}
		cluster, ok := simulator.Map.Get(req.This).(*simulator.ClusterComputeResource)
		if !ok {
			return
		}
		var shared []types.ManagedObjectReference
		simulator.Map.WithLock(cluster, func() {
			shared = append(shared, cluster.Datastore...)
		})
		for _, dsRef := range shared {
			mountDatastore(host, dsRef)
		}
		var peers []types.ManagedObjectReference
		simulator.Map.WithLock(cluster, func() { peers = append(peers, cluster.Host...) })
		joinSwitches(host.Self, peers)
		simulator.Map.WithLock(host, func() { setManagementAddress(host) })
	}
}

// mountDatastore adds a datastore to a host's lists and the host to the datastore's mounts.
func mountDatastore(host *simulator.HostSystem, dsRef types.ManagedObjectReference) {
	ds, ok := simulator.Map.Get(dsRef).(*simulator.Datastore)
	if !ok {
		return
	}
	simulator.Map.WithLock(host, func() {
		simulator.Map.Update(host, []types.PropertyChange{{Name: "datastore", Val: refsWith(host.Datastore, dsRef)}})
		if host.ConfigManager.DatastoreSystem == nil {
			return
		}
		if dss, isDSS := simulator.Map.Get(*host.ConfigManager.DatastoreSystem).(*simulator.HostDatastoreSystem); isDSS {
			simulator.Map.WithLock(dss, func() { dss.Datastore = refsWith(dss.Datastore, dsRef) })
		}
	})
	simulator.Map.WithLock(ds, func() {
		for _, m := range ds.Host {
			if m.Key == host.Self {
				return
			}
		}
		mounts := append(append([]types.DatastoreHostMount(nil), ds.Host...), types.DatastoreHostMount{
			Key: host.Self,
			MountInfo: types.HostMountInfo{
				Path:       ds.Summary.Url,
				AccessMode: string(types.HostMountModeReadWrite),
				Mounted:    types.NewBool(true),
				Accessible: types.NewBool(true),
			},
		})
		simulator.Map.Update(ds, []types.PropertyChange{{Name: "host", Val: mounts}})
	})
}

// joinSwitches adds a host to every distributed switch that one of its peers belongs to.
func joinSwitches(host types.ManagedObjectReference, peers []types.ManagedObjectReference) {
	for _, e := range simulator.Map.All("DistributedVirtualSwitch") {
		dvs, ok := e.(*simulator.DistributedVirtualSwitch)
		if !ok {
			continue
		}
		simulator.Map.WithLock(dvs, func() {
			join := false
			for _, m := range dvs.Summary.HostMember {
				if m == host {
					return
				}
				for _, p := range peers {
					if p == m {
						join = true
					}
				}
			}
			if !join {
				return
			}
			spec := &types.DVSConfigSpec{Host: []types.DistributedVirtualSwitchHostMemberConfigSpec{{
				Operation: string(types.ConfigSpecOperationAdd),
				Host:      host,
			}}}
			dvs.ReconfigureDvsTask(&types.ReconfigureDvs_Task{This: dvs.Self, Spec: spec})
		})
	}
}
