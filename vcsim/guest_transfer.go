// Guest file transfer tickets and the /guestFile HTTP endpoint (tickets are made by
// guest_files.go; the endpoint is registered by installGuest on the simulator's mux).
//
// A ticket is a URL https://*:PORT/guestFile?id=ID&token=TOKEN (ID and TOKEN letters
// only, so clients that rewrite "443" in URLs cannot damage them). It is single-use,
// expires after 10 minutes (the environment variable VCSIM_GUEST_TICKET_TTL, a Go
// duration such as "2s", shortens that for tests), and dies when its VM's power state
// changes or the VM goes away (guestObserver) or boots again (checked at use). GET streams a file with
// Content-Length; PUT must carry exactly the announced fileSize bytes (anything else
// is 400 and nothing is written); the upload goes to a temporary file in the target
// directory and is renamed into place.
package main

import (
	"crypto/rand"
	"crypto/subtle"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	guestFilePattern = "/guestFile" // exact; the library owns "/guestFile/"
	guestMaxTickets  = 10000
	guestMaxUpload   = 4 << 30 // bytes per uploaded file
)

type guestTicket struct {
	token     string
	vm        *guestVM
	path      *guestPathSpec
	upload    bool
	size      int64
	overwrite bool
	attrs     types.BaseGuestFileAttributes
	expires   time.Time
}

// guestTicketTTL is how long a transfer URL stays valid (see installGuest).
var guestTicketTTL = 10 * time.Minute

// setTicketTTL applies VCSIM_GUEST_TICKET_TTL when it holds a positive duration.
func setTicketTTL() {
	if v := os.Getenv("VCSIM_GUEST_TICKET_TTL"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			guestTicketTTL = d
		}
	}
}

var guestTickets = struct {
	sync.Mutex
	m map[string]*guestTicket
}{m: make(map[string]*guestTicket)}

const guestLetters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

// guestRandLetters returns n unbiased random ASCII letters.
func guestRandLetters(n int) (string, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 2*n)
	for len(out) < n {
		if _, err := rand.Read(buf); err != nil {
			return "", err
		}
		for _, b := range buf {
			if int(b) < 4*len(guestLetters) && len(out) < n {
				out = append(out, guestLetters[int(b)%len(guestLetters)])
			}
		}
	}
	return string(out), nil
}

// newGuestTicket registers a transfer and returns its URL.
func newGuestTicket(g *guestVM, gp *guestPathSpec, upload bool, size int64, overwrite bool, attrs types.BaseGuestFileAttributes) (string, *soap.Fault) {
	id, err := guestRandLetters(20)
	if err == nil {
		var tok string
		tok, err = guestRandLetters(32)
		if err == nil {
			t := &guestTicket{token: tok, vm: g, path: gp, upload: upload, size: size,
				overwrite: overwrite, attrs: attrs, expires: time.Now().Add(guestTicketTTL)}
			guestTickets.Lock()
			now := time.Now()
			for k, v := range guestTickets.m {
				if now.After(v.expires) {
					delete(guestTickets.m, k)
				}
			}
			full := len(guestTickets.m) >= guestMaxTickets
			if !full {
				guestTickets.m[id] = t
			}
			guestTickets.Unlock()
			if full {
				return "", simulator.Fault("too many outstanding guest file transfers", &types.GuestOperationsFault{})
			}
			return fmt.Sprintf("%s://*:%s%s?id=%s&token=%s", guestScheme, guestPort, guestFilePattern, id, tok), nil
		}
	}
	return "", simulator.Fault("cannot create a transfer ticket: "+err.Error(), &types.GuestOperationsFault{})
}

// dropGuestTickets invalidates every ticket of one VM.
func dropGuestTickets(vm types.ManagedObjectReference) {
	guestTickets.Lock()
	for k, v := range guestTickets.m {
		if v.vm.ref == vm {
			delete(guestTickets.m, k)
		}
	}
	guestTickets.Unlock()
}

// takeGuestTicket removes and returns a valid ticket for the request, or an HTTP status.
func takeGuestTicket(r *http.Request) (*guestTicket, int, string) {
	q := r.URL.Query()
	id, tok := q.Get("id"), q.Get("token")
	guestTickets.Lock()
	t := guestTickets.m[id]
	if t == nil || subtle.ConstantTimeCompare([]byte(t.token), []byte(tok)) != 1 {
		guestTickets.Unlock()
		return nil, http.StatusNotFound, "unknown, used or expired transfer ticket"
	}
	want := http.MethodGet
	if t.upload {
		want = http.MethodPut
	}
	if r.Method != want {
		guestTickets.Unlock()
		return nil, http.StatusMethodNotAllowed, "this ticket is for " + want
	}
	delete(guestTickets.m, id)
	guestTickets.Unlock()
	if time.Now().After(t.expires) {
		return nil, http.StatusNotFound, "unknown, used or expired transfer ticket"
	}
	// The VM must still be in the run the ticket was issued for.
	vm, ok := simulator.Map.Get(t.vm.ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, http.StatusNotFound, "the virtual machine no longer exists"
	}
	var on bool
	var boot time.Time
	simulator.Map.WithLock(vm, func() {
		on = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
		if vm.Summary.Runtime.BootTime != nil {
			boot = *vm.Summary.Runtime.BootTime
		}
	})
	if !on || !boot.Equal(t.vm.boot) {
		return nil, http.StatusNotFound, "the virtual machine was powered off since the transfer was initiated"
	}
	return t, 0, ""
}

// serveGuestFile serves /guestFile: GET downloads, PUT uploads.
func serveGuestFile(w http.ResponseWriter, r *http.Request) {
	t, status, msg := takeGuestTicket(r)
	if t == nil {
		http.Error(w, msg, status)
		return
	}
	if t.upload {
		serveGuestUpload(w, r, t)
		return
	}
	serveGuestDownload(w, t)
}

func serveGuestDownload(w http.ResponseWriter, t *guestTicket) {
	g, gp := t.vm, t.path
	res, err := g.resolve(gp.comps, true)
	if err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, guestHTTPStatus(err))
		return
	}
	if !res.exists || !res.info.Mode().IsRegular() {
		http.Error(w, "not a file: "+gp.guest, http.StatusNotFound)
		return
	}
	f, err := guestOpenNoFollow(res.host)
	if err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, guestHTTPStatus(err))
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		http.Error(w, "not a file: "+gp.guest, http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	w.WriteHeader(http.StatusOK)
	_, _ = io.CopyN(w, f, fi.Size())
}

func serveGuestUpload(w http.ResponseWriter, r *http.Request, t *guestTicket) {
	g, gp := t.vm, t.path
	if r.ContentLength >= 0 && r.ContentLength != t.size {
		http.Error(w, fmt.Sprintf("expected exactly %d bytes, request announces %d", t.size, r.ContentLength),
			http.StatusBadRequest)
		return
	}
	if f := g.checkUploadTarget(gp, t.overwrite); f != nil {
		http.Error(w, f.String, faultHTTPStatus(f))
		return
	}
	res, err := g.resolve(gp.comps, true)
	if err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, guestHTTPStatus(err))
		return
	}
	target := res.target()
	dir := filepath.Dir(target)
	tmp, err := os.CreateTemp(dir, ".vcsim-upload-*")
	if err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, guestHTTPStatus(err))
		return
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	n, err := io.Copy(tmp, io.LimitReader(r.Body, t.size+1))
	if err != nil {
		http.Error(w, "upload interrupted", http.StatusBadRequest)
		return
	}
	if n != t.size {
		http.Error(w, fmt.Sprintf("expected exactly %d bytes, received %d or more", t.size, n), http.StatusBadRequest)
		return
	}
	if err := tmp.Close(); err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, http.StatusInternalServerError)
		return
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, http.StatusInternalServerError)
		return
	}
	if fi, err := os.Lstat(tmp.Name()); err == nil {
		if err := applyGuestAttributes(tmp.Name(), fi, t.attrs, false); err != nil {
			http.Error(w, guestFSFault(gp.guest, err).String, http.StatusInternalServerError)
			return
		}
	}
	if !t.overwrite {
		if _, err := os.Lstat(target); err == nil {
			http.Error(w, "file already exists: "+gp.guest, http.StatusConflict)
			return
		}
	}
	if err := os.Rename(tmp.Name(), target); err != nil {
		http.Error(w, guestFSFault(gp.guest, err).String, guestHTTPStatus(err))
		return
	}
	done = true
	w.WriteHeader(http.StatusOK)
}

// guestHTTPStatus maps a file system error to an HTTP status.
func guestHTTPStatus(err error) int {
	switch {
	case os.IsNotExist(err), err == errGuestNotDir:
		return http.StatusNotFound
	case os.IsPermission(err):
		return http.StatusForbidden
	}
	if _, ok := err.(*guestEscapeError); ok || err == errGuestLoop {
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

// faultHTTPStatus maps a guest fault met while serving a transfer to an HTTP status.
func faultHTTPStatus(f *soap.Fault) int {
	switch f.Detail.Fault.(type) {
	case *types.FileNotFound:
		return http.StatusNotFound
	case *types.GuestPermissionDenied:
		return http.StatusForbidden
	case *types.FileAlreadyExists, *types.NotAFile:
		return http.StatusConflict
	}
	return http.StatusBadRequest
}
