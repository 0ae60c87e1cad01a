// Guest operations for the bundled simulator: per-VM guest file trees under
// opts.GuestRoot, our own GuestFileManager and GuestProcessManager (replacing the
// library's Docker-only singletons) and the /guestFile transfer endpoint.
//
// Called by main.go: installGuest after NewServer; vmRootDir and copyTree from clone
// and snapshot handling. Calls the govmomi simulator registry (Map.Get/WithLock/Put/
// AddHandler) and the host file system below opts.GuestRoot only.
//
// Locking: our managers opt out of the registry's per-object lock (no-op Lock/Unlock);
// a VM is read under Map.WithLock(vm) and nothing else is held meanwhile. Our own
// mutexes (tickets, processes) are leaf locks: nothing that takes a registry lock is
// called while one of them is held.
package main

import (
	"crypto/subtle"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	guestFileManagerRef = types.ManagedObjectReference{
		Type: "GuestFileManager", Value: "guestOperationsFileManager"}
	guestProcessManagerRef = types.ManagedObjectReference{
		Type: "GuestProcessManager", Value: "guestOperationsProcessManager"}
	// guestScheme and guestPort form transfer URLs https://*:PORT/guestFile?...
	guestScheme = "https"
	guestPort   = "443"
)

// installGuest registers the guest operation handlers on svc and replaces the
// library's GuestFileManager / GuestProcessManager singletons.
func installGuest(svc *simulator.Service, srv *simulator.Server) {
	if srv != nil && srv.URL != nil {
		guestScheme = srv.URL.Scheme
		guestPort = srv.URL.Port()
	}
	setTicketTTL()
	fm := &guestFileManager{}
	fm.Self = guestFileManagerRef
	simulator.Map.Put(fm)
	pm := &guestProcessManager{}
	pm.Self = guestProcessManagerRef
	simulator.Map.Put(pm)
	simulator.Map.AddHandler(guestObserver{})
	svc.ServeMux.HandleFunc(guestFilePattern, serveGuestFile)
	if srv != nil && srv.Config != nil {
		srv.Config.Handler = &guestFileGuard{next: srv.Config.Handler}
	}
}

// guestFileGuard answers 404 for the library's own "/guestFile/..." endpoint: it is
// unauthenticated and shells out to docker with a client-chosen path, and nothing we
// hand out points there (our transfers use the exact path "/guestFile").
type guestFileGuard struct {
	next http.Handler
}

func (h *guestFileGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, guestFilePattern+"/") {
		http.NotFound(w, r)
		return
	}
	h.next.ServeHTTP(w, r)
}

// vmRootDir returns the guest root directory of the named VM, creating it on demand.
func vmRootDir(vmName string) string {
	root := opts.GuestRoot
	if root == "" {
		root = filepath.Join(os.TempDir(), "vcsim-guest")
	}
	// vSphere already escapes "/" in names as %2f; never let a name be a path.
	name := strings.ReplaceAll(vmName, "/", "%2f")
	if name == "" || name == "." || name == ".." {
		name = "_" + name
	}
	dir := filepath.Join(root, name)
	_ = os.MkdirAll(dir, 0o755)
	return dir
}

// guestVM is what one guest operation needs to know about its VM, read once under
// the VM's lock after the preconditions passed.
type guestVM struct {
	ref     types.ManagedObjectReference
	name    string
	windows bool
	root    string // host path of the VM root, symlinks resolved
	boot    time.Time
}

// guestPrepare checks the preconditions of every guest operation, in vSphere's order:
// power state, then tools, then credentials.
func guestPrepare(ref types.ManagedObjectReference, auth types.BaseGuestAuthentication) (*guestVM, *soap.Fault) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, simulator.Fault(fmt.Sprintf("managed object not found: %s", ref.Value),
			&types.ManagedObjectNotFound{Obj: ref})
	}
	var (
		power   types.VirtualMachinePowerState
		tools   string
		guestID string
		g       = &guestVM{ref: ref}
	)
	simulator.Map.WithLock(vm, func() {
		power = vm.Runtime.PowerState
		if vm.Guest != nil {
			tools = vm.Guest.ToolsRunningStatus
		}
		if vm.Config != nil {
			guestID = vm.Config.GuestId
		}
		g.name = vm.Name
		if vm.Summary.Runtime.BootTime != nil {
			g.boot = *vm.Summary.Runtime.BootTime
		}
	})
	if power != types.VirtualMachinePowerStatePoweredOn {
		return nil, simulator.Fault(fmt.Sprintf("VM %q is not powered on (state %s)", g.name, power),
			&types.InvalidPowerState{
				RequestedState: types.VirtualMachinePowerStatePoweredOn,
				ExistingState:  power,
			})
	}
	if tools != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
		return nil, simulator.Fault(fmt.Sprintf("guest operations agent (VMware Tools) is not running in VM %q", g.name),
			&types.GuestOperationsUnavailable{})
	}
	if !guestLoginOK(auth) {
		return nil, simulator.Fault("failed to authenticate with the guest operating system using the supplied credentials",
			&types.InvalidGuestLogin{})
	}
	g.windows = strings.HasPrefix(strings.ToLower(guestID), "win")
	root := vmRootDir(g.name)
	if real, err := filepath.EvalSymlinks(root); err == nil {
		root = real
	}
	g.root = filepath.Clean(root)
	if g.windows && guestLookupFold(g.root, "C") == "C" {
		_ = os.Mkdir(filepath.Join(g.root, "C"), 0o755) // a Windows guest always has C:
	}
	return g, nil
}

// guestLoginOK accepts only NamePasswordAuthentication with the configured account.
func guestLoginOK(auth types.BaseGuestAuthentication) bool {
	creds, ok := auth.(*types.NamePasswordAuthentication)
	if !ok || creds == nil || creds.Username == "" || opts.GuestUser == "" {
		return false
	}
	u := subtle.ConstantTimeCompare([]byte(creds.Username), []byte(opts.GuestUser))
	p := subtle.ConstantTimeCompare([]byte(creds.Password), []byte(opts.GuestPassword))
	return u&p == 1
}

// guestObserver watches the registry: a VM whose power state changes (or that is
// destroyed) loses its transfer tickets and its simulated processes.
type guestObserver struct{}

func (guestObserver) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VcsimGuestObserver", Value: "guest-operations"}
}

func (guestObserver) PutObject(mo.Reference) {}

func (guestObserver) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	ref := obj.Reference()
	if ref.Type != "VirtualMachine" {
		return
	}
	for i := range changes {
		if changes[i].Name == "runtime.powerState" || changes[i].Name == "summary.runtime.powerState" {
			guestVMStopped(ref)
			return
		}
	}
}

func (guestObserver) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type == "VirtualMachine" {
		guestVMStopped(ref)
	}
}

// guestVMStopped forgets everything tied to one run of the VM.
func guestVMStopped(ref types.ManagedObjectReference) {
	dropGuestTickets(ref)
	dropGuestProcesses(ref)
}

// copyTree copies the directory tree src to dst (dst is replaced, its parent created),
// preserving modes and modification times; symlinks are copied as links and never
// followed. An absolute link that points inside src is rewritten to the same place
// inside dst, so a clone's links stay in the clone and a snapshot round trip restores
// them unchanged; every other link is copied verbatim.
func copyTree(src, dst string) error {
	st, err := os.Lstat(src)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("copyTree: %s is not a directory", src)
	}
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	srcClean := filepath.Clean(src)
	type dirTime struct {
		path string
		mt   time.Time
		perm os.FileMode
	}
	var dirs []dirTime
	err = filepath.Walk(src, func(p string, fi os.FileInfo, werr error) error {
		if werr != nil {
			return werr
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		mode := fi.Mode()
		switch {
		case mode&os.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if filepath.IsAbs(link) {
				if rel, ok := guestWithinRoot(srcClean, filepath.Clean(link)); ok {
					link = filepath.Join(dst, rel)
				}
			}
			return os.Symlink(link, target)
		case mode.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirTime{target, fi.ModTime(), mode & keepModeBits})
			return nil
		case mode.IsRegular():
			if err := copyTreeFile(p, target, mode&keepModeBits); err != nil {
				return err
			}
			return os.Chtimes(target, fi.ModTime(), fi.ModTime())
		default:
			return nil // devices, sockets, fifos: not part of a guest tree
		}
	})
	if err != nil {
		return err
	}
	// Directory modes and mtimes last, deepest first, since creating entries changes
	// them and a read-only directory could not receive its entries.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chmod(dirs[i].path, dirs[i].perm); err != nil {
			return err
		}
		if err := os.Chtimes(dirs[i].path, dirs[i].mt, dirs[i].mt); err != nil {
			return err
		}
	}
	return nil
}

// keepModeBits are the mode bits copyTree preserves.
const keepModeBits = os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky

func copyTreeFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, perm)
}

// guestBody is the SOAP body of every guest operation, in place of the library's
// methods.*Body types: the simulator reads only Fault() and the Res field, which it
// encodes under the name of Res's type.
type guestBody[R any] struct {
	Res    *R
	Fault_ *soap.Fault
}

func (b *guestBody[R]) Fault() *soap.Fault { return b.Fault_ }

// guestReply answers with the fault f, or when f is nil with res.
func guestReply[R any](res *R, f *soap.Fault) soap.HasFault {
	if f != nil {
		return &guestBody[R]{Fault_: f}
	}
	return &guestBody[R]{Res: res}
}

// guestDone answers an operation that has no result: the fault f, or an empty R.
func guestDone[R any](f *soap.Fault) soap.HasFault {
	return guestReply(new(R), f)
}
