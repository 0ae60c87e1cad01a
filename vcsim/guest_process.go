// GuestProcessManager for the simulator (called by the govmomi SOAP dispatcher through
// reflection). It never runs anything on the simulator's host: processes are a model.
//
// The process model:
//   - StartProgramInGuest returns a new pid (per VM, increasing from 4000). The program
//     path is mapped like any guest path; the working directory, when given, must be an
//     existing guest directory (else FileNotFound).
//   - "/bin/false" (also "false", "/usr/bin/false") finishes at once with exit code 1.
//   - "sleep N" / "/bin/sleep N" (also "/usr/bin/sleep"; N in seconds, fractions and an
//     s/m/h suffix allowed) runs N seconds and then ends with exit code 0; a bad N ends
//     at once with exit code 1.
//   - Any other program must exist as a regular file in the guest tree (else
//     FileNotFound) and finishes at once with exit code 0.
//   - TerminateProcessInGuest ends a running process with exit code 143 (Linux,
//     128+SIGTERM) or 1 (Windows); an unknown or already finished pid is
//     GuestProcessNotFound.
//   - ListProcessesInGuest lists the processes started in this run of the VM (all, or
//     those of the given pids; unknown pids are left out) with name, pid, owner (the
//     guest user), cmdLine, startTime, and endTime + exitCode once finished. Finished
//     processes stay listed for 5 minutes, as on a real guest. Powering the VM off
//     forgets all of them.
package main

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	guestFirstPid     = 4000
	guestFinishedKeep = 5 * time.Minute
	guestMaxProcs     = 1000
	guestMaxSleep     = 365 * 24 * 3600
)

type guestProc struct {
	pid      int64
	name     string
	owner    string
	cmdLine  string
	start    time.Time
	end      time.Time // when it ends (or ended); zero while it runs indefinitely
	exitCode int32
}

// finished reports whether the process has ended by now.
func (p *guestProc) finished(now time.Time) bool {
	return !p.end.IsZero() && !now.Before(p.end)
}

type guestVMProcs struct {
	next  int64
	procs map[int64]*guestProc
}

var guestProcTable = struct {
	sync.Mutex
	m map[types.ManagedObjectReference]*guestVMProcs
}{m: make(map[types.ManagedObjectReference]*guestVMProcs)}

// dropGuestProcesses forgets the processes of one VM (it powered off or went away).
func dropGuestProcesses(vm types.ManagedObjectReference) {
	guestProcTable.Lock()
	delete(guestProcTable.m, vm)
	guestProcTable.Unlock()
}

// guestProcessManager replaces the library's GuestProcessManager.
type guestProcessManager struct {
	mo.GuestProcessManager
}

// Lock and Unlock opt out of the registry's per-object lock (see guestFileManager).
func (m *guestProcessManager) Lock()   {}
func (m *guestProcessManager) Unlock() {}

// guestBuiltin names the programs the model knows without a file in the guest.
func guestBuiltin(program string) string {
	switch program {
	case "false", "/bin/false", "/usr/bin/false":
		return "false"
	case "sleep", "/bin/sleep", "/usr/bin/sleep":
		return "sleep"
	}
	return ""
}

// guestSleepDuration parses the first argument of sleep.
func guestSleepDuration(args string) (time.Duration, bool) {
	f := strings.Fields(args)
	if len(f) == 0 {
		return 0, false
	}
	s, unit := f[0], time.Second
	switch {
	case strings.HasSuffix(s, "s"):
		s = strings.TrimSuffix(s, "s")
	case strings.HasSuffix(s, "m"):
		s, unit = strings.TrimSuffix(s, "m"), time.Minute
	case strings.HasSuffix(s, "h"):
		s, unit = strings.TrimSuffix(s, "h"), time.Hour
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 || v*float64(unit/time.Second) > guestMaxSleep {
		return 0, false
	}
	return time.Duration(v * float64(unit)), true
}

// guestBaseName is the last component of a Linux or Windows program path.
func guestBaseName(p string) string {
	if i := strings.LastIndexAny(p, `/\`); i >= 0 {
		return p[i+1:]
	}
	return p
}

func (m *guestProcessManager) StartProgramInGuest(ctx *simulator.Context, req *types.StartProgramInGuest) soap.HasFault {
	return guestReply(guestStartProgram(req))
}

// guestStartProgram checks the program spec and adds a process to the VM's table.
func guestStartProgram(req *types.StartProgramInGuest) (*types.StartProgramInGuestResponse, *soap.Fault) {
	g, f := guestPrepare(req.Vm, req.Auth)
	if f != nil {
		return nil, f
	}
	if req.Spec == nil {
		return nil, faultGuestArgument("spec", "a program spec is required")
	}
	spec := req.Spec.GetGuestProgramSpec()
	program := strings.TrimSpace(spec.ProgramPath)
	if program == "" {
		return nil, faultGuestArgument("spec.programPath", "programPath must not be empty")
	}
	if len(spec.Arguments) > guestMaxPathLen*4 {
		return nil, faultGuestArgument("spec.arguments", "arguments too long")
	}
	if spec.WorkingDirectory != "" {
		gp, r, f := g.existingPath(spec.WorkingDirectory, true)
		if f != nil {
			return nil, f
		}
		if !r.info.IsDir() {
			return nil, faultGuestNotFound(gp.guest)
		}
	}
	now := time.Now()
	p := &guestProc{
		name:    guestBaseName(program),
		owner:   opts.GuestUser,
		cmdLine: strings.TrimSpace(program + " " + spec.Arguments),
		start:   now,
		end:     now,
	}
	switch guestBuiltin(program) {
	case "false":
		p.exitCode = 1
	case "sleep":
		if d, ok := guestSleepDuration(spec.Arguments); ok {
			p.end = now.Add(d)
		} else {
			p.exitCode = 1
		}
	default:
		if f := g.checkProgram(program); f != nil {
			return nil, f
		}
	}
	guestProcTable.Lock()
	vp := guestProcTable.m[g.ref]
	if vp == nil {
		vp = &guestVMProcs{next: guestFirstPid, procs: make(map[int64]*guestProc)}
		guestProcTable.m[g.ref] = vp
	}
	pruneGuestProcs(vp, now)
	full := len(vp.procs) >= guestMaxProcs
	if !full {
		p.pid = vp.next
		vp.next++
		vp.procs[p.pid] = p
	}
	guestProcTable.Unlock()
	if full {
		return nil, simulator.Fault(fmt.Sprintf("too many processes in VM %q", g.name), &types.GuestOperationsFault{})
	}
	return &types.StartProgramInGuestResponse{Returnval: p.pid}, nil
}

// checkProgram checks that program is a regular file in the guest tree.
func (g *guestVM) checkProgram(program string) *soap.Fault {
	notFound := func() *soap.Fault {
		return simulator.Fault("program not found in the guest: "+program,
			&types.FileNotFound{FileFault: types.FileFault{File: program}})
	}
	gp, f := g.parseGuestPath(program)
	if f != nil {
		return notFound()
	}
	r, err := g.resolve(gp.comps, true)
	if err != nil {
		return guestFSFault(gp.guest, err)
	}
	if !r.exists || !r.info.Mode().IsRegular() {
		return notFound()
	}
	return nil
}

// pruneGuestProcs forgets processes that finished more than guestFinishedKeep ago.
func pruneGuestProcs(vp *guestVMProcs, now time.Time) {
	for pid, p := range vp.procs {
		if p.finished(now) && now.Sub(p.end) > guestFinishedKeep {
			delete(vp.procs, pid)
		}
	}
}

func (m *guestProcessManager) ListProcessesInGuest(ctx *simulator.Context, req *types.ListProcessesInGuest) soap.HasFault {
	return guestReply(guestListProcs(req))
}

// guestListProcs lists the VM's processes (all, or those of req.Pids), ordered by pid.
func guestListProcs(req *types.ListProcessesInGuest) (*ListProcessesInGuestResponse, *soap.Fault) {
	g, f := guestPrepare(req.Vm, req.Auth)
	if f != nil {
		return nil, f
	}
	want := make(map[int64]bool, len(req.Pids))
	for _, pid := range req.Pids {
		want[pid] = true
	}
	now := time.Now()
	res := &ListProcessesInGuestResponse{}
	guestProcTable.Lock()
	if vp := guestProcTable.m[g.ref]; vp != nil {
		pruneGuestProcs(vp, now)
		for pid, p := range vp.procs {
			if len(want) > 0 && !want[pid] {
				continue
			}
			info := guestProcessInfo{
				Name:      p.name,
				Pid:       p.pid,
				Owner:     p.owner,
				CmdLine:   p.cmdLine,
				StartTime: p.start.UTC(),
			}
			if p.finished(now) {
				end := p.end.UTC()
				code := p.exitCode
				info.EndTime = &end
				info.ExitCode = &code
			}
			res.Returnval = append(res.Returnval, info)
		}
	}
	guestProcTable.Unlock()
	sort.Slice(res.Returnval, func(i, j int) bool { return res.Returnval[i].Pid < res.Returnval[j].Pid })
	return res, nil
}

func (m *guestProcessManager) TerminateProcessInGuest(ctx *simulator.Context, req *types.TerminateProcessInGuest) soap.HasFault {
	return guestDone[types.TerminateProcessInGuestResponse](guestTerminate(req))
}

// guestTerminate ends a running process: exit code 143 (128+SIGTERM), 1 on Windows.
func guestTerminate(req *types.TerminateProcessInGuest) *soap.Fault {
	g, f := guestPrepare(req.Vm, req.Auth)
	if f != nil {
		return f
	}
	pid := req.Pid
	now := time.Now()
	found := false
	guestProcTable.Lock()
	if vp := guestProcTable.m[g.ref]; vp != nil {
		if p := vp.procs[pid]; p != nil && !p.finished(now) {
			found = true
			p.end = now
			p.exitCode = 143
			if g.windows {
				p.exitCode = 1
			}
		}
	}
	guestProcTable.Unlock()
	if !found {
		return simulator.Fault(fmt.Sprintf("no running process with pid %d in the guest", pid),
			&types.GuestProcessNotFound{Pid: pid})
	}
	return nil
}

// guestProcessInfo is types.GuestProcessInfo with exitCode always sent once set:
// the library's type drops exitCode 0 (omitempty), and clients such as Ansible's
// vmware_vm_shell read a missing exitCode as a failure.
type guestProcessInfo struct {
	Name      string     `xml:"name"`
	Pid       int64      `xml:"pid"`
	Owner     string     `xml:"owner"`
	CmdLine   string     `xml:"cmdLine"`
	StartTime time.Time  `xml:"startTime"`
	EndTime   *time.Time `xml:"endTime,omitempty"`
	ExitCode  *int32     `xml:"exitCode,omitempty"`
}

// ListProcessesInGuestResponse is encoded by the simulator under its type name, so
// it must be called exactly this.
type ListProcessesInGuestResponse struct {
	Returnval []guestProcessInfo `xml:"returnval,omitempty"`
}
