package main

// The front handler: every SOAP call on /sdk and /sdk/vimService passes through here. The
// library has no per-method hook, so behaviour changes are made around the call: the body is
// decoded once, a few methods are rewritten before the call (MigrateVM_Task, QueryEvents),
// the call is passed to the library's handler into a buffer, and, only if it succeeded, the
// inventory is corrected (placement, snapshots, tools, events) before the client sees the
// answer. No Map lock is held while the library handles the call (locks are not re-entrant).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// maxSOAPBody bounds what one SOAP request may carry.
const maxSOAPBody = 64 << 20

// internalCtx is the simulator context our own calls into library objects use.
// user is the vCenter user on whose behalf we act (events name them).
func internalCtx(user string) *simulator.Context {
	return &simulator.Context{
		Context: context.Background(),
		Session: &simulator.Session{
			UserSession: types.UserSession{Key: "vcsim-internal", UserName: user},
			Registry:    simulator.NewRegistry(),
		},
		Map: simulator.Map,
	}
}

// installCore wires the pieces this file set owns into a started server.
func installCore(srv *simulator.Server) {
	installHosts()
	installTools()
	installNics()
	if addr, ok := srv.Listener.Addr().(*net.TCPAddr); ok {
		nfcFrom = []byte("https://*/nfc/")
		nfcTo = []byte("https://*:" + strconv.Itoa(addr.Port) + "/nfc/")
	}
	srv.Config.Handler = &folderGuard{next: &front{next: srv.Config.Handler}}
}

// The library's ImportVApp / ExportVm lease URLs are https://*/nfc/... without the port; a
// client that puts the host's address in place of `*` would dial port 443. Every SOAP answer
// carrying such a URL gets the simulator's port.
var nfcFrom, nfcTo []byte

func fixNFCURLs(rec *httptest.ResponseRecorder) {
	if len(nfcFrom) == 0 || !bytes.Contains(rec.Body.Bytes(), nfcFrom) {
		return
	}
	rec.Body = bytes.NewBuffer(bytes.Replace(rec.Body.Bytes(), nfcFrom, nfcTo, -1))
}

type front struct {
	next http.Handler
}

// call is one decoded SOAP request on its way through the front handler.
type soapCall struct {
	r      *http.Request
	body   []byte
	method *simulator.Method
}

// pass hands a (possibly rewritten) body to the library and returns the buffered answer.
// A panic in the library (e.g. Fetch of an unset property such as a VM's `snapshot`) becomes
// a proper answer instead of a dropped connection; the library's locks are released by
// their deferred unlocks.
func (f *front) pass(c *soapCall, body []byte) (rec *httptest.ResponseRecorder) {
	r2 := c.r.Clone(c.r.Context())
	r2.Body = io.NopCloser(bytes.NewReader(body))
	r2.ContentLength = int64(len(body))
	r2.Header.Set("Content-Length", strconv.Itoa(len(body)))
	rec = httptest.NewRecorder()
	defer func() {
		if p := recover(); p != nil {
			name := ""
			if c.method != nil {
				name = c.method.Name
			}
			rec = panicAnswer(name, p)
		}
	}()
	f.next.ServeHTTP(rec, r2)
	return rec
}

const envelopeStart = xml.Header + `<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`

const envelopeEnd = `</soapenv:Body></soapenv:Envelope>`

// panicAnswer is what the client gets when the library panicked: an unset property for
// Fetch (what a real vCenter answers), a SystemError fault otherwise.
func panicAnswer(method string, p interface{}) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Type", "text/xml; charset=utf-8")
	if method == "Fetch" {
		rec.WriteHeader(http.StatusOK)
		rec.Body.WriteString(envelopeStart + `<FetchResponse xmlns="urn:vim25"></FetchResponse>` + envelopeEnd)
		return rec
	}
	log.Printf("%s: internal error: %v", method, p)
	var msg bytes.Buffer
	_ = xml.EscapeText(&msg, []byte(fmt.Sprintf("internal simulator error in %s", method)))
	rec.WriteHeader(http.StatusInternalServerError)
	rec.Body.WriteString(envelopeStart + `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>` +
		msg.String() + `</faultstring><detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>` +
		msg.String() + `</reason></SystemErrorFault></detail></soapenv:Fault>` + envelopeEnd)
	return rec
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || (r.URL.Path != "/sdk" && r.URL.Path != "/sdk/vimService") {
		f.next.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxSOAPBody+1))
	_ = r.Body.Close()
	if err != nil || len(body) > maxSOAPBody {
		http.Error(w, "request body unreadable or too large", http.StatusRequestEntityTooLarge)
		return
	}
	c := &soapCall{r: r, body: body}
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		// The library answers malformed requests with its own fault.
		writeRecorded(w, f.pass(c, body))
		return
	}
	c.method = method

	var rec *httptest.ResponseRecorder
	switch req := method.Body.(type) {
	case *types.MigrateVM_Task:
		rec = f.migrate(c, req)
	case *types.PowerOnVM_Task:
		rec = f.powerOnCall(c, req)
	case *types.QueryEvents:
		rec = f.queryEvents(c, req)
	case *types.PostEvent:
		rec = f.postEvent(c, req)
	case *types.ReadNextEvents:
		rec = f.scroll(c, req.This)
	case *types.ReadPreviousEvents:
		rec = f.scroll(c, req.This)
	case *types.ResetCollector:
		rec = f.scroll(c, req.This)
	case *types.CreateSnapshot_Task:
		if snapshotsDisabled(req.This) {
			rec = snapshotRefused(req.This, &types.SnapshotDisabled{})
			break
		}
		if req.Memory && independentDisk(req.This) {
			rec = snapshotRefused(req.This, &types.MemorySnapshotOnIndependentDisk{})
			break
		}
		rec = f.passWithFixup(c, method, r)
	case *types.RewindCollector:
		rec = f.scroll(c, req.This)
	case *types.AcquireGenericServiceTicket:
		// A real vCenter's round trip (-ticket-delay, folder.go); no lock is held here.
		time.Sleep(ticketDelay)
		rec = f.passWithFixup(c, method, r)
	default:
		rec = f.passWithFixup(c, method, r)
		if login, ok := method.Body.(*types.Login); ok && rec.Code == http.StatusOK {
			rememberUser(rec, login.UserName)
		}
	}
	fixNFCURLs(rec)
	writeRecorded(w, rec)
}

// passWithFixup passes the call to the library and runs its fix-up if it succeeded.
func (f *front) passWithFixup(c *soapCall, method *simulator.Method, r *http.Request) *httptest.ResponseRecorder {
	before := fixupFor(method, userOf(r))
	rec := f.pass(c, c.body)
	if rec.Code == http.StatusOK && before != nil {
		before(rec.Body.Bytes())
	}
	return rec
}

// fixupFor runs before the call (recording what the fix-up needs) and returns the fix-up,
// which runs only if the call answered without a fault.
func fixupFor(method *simulator.Method, user string) func(response []byte) {
	switch req := method.Body.(type) {
	case *types.CreateSnapshot_Task:
		return withDisk(afterCreateSnapshot(req), func() types.ManagedObjectReference { return req.This }, leafEmpty)
	case *types.RevertToSnapshot_Task:
		vmRef := snapshotVM(req.This)
		return withDisk(afterRevertToSnapshot(req, user), func() types.ManagedObjectReference { return vmRef }, leafEmpty)
	case *types.RevertToCurrentSnapshot_Task:
		return withDisk(afterRevertToCurrentSnapshot(req, user), func() types.ManagedObjectReference { return req.This }, leafEmpty)
	case *types.RemoveSnapshot_Task:
		vmRef := snapshotVM(req.This)
		return withDisk(afterRemoveSnapshot(req), func() types.ManagedObjectReference { return vmRef }, leafLive)
	case *types.RemoveAllSnapshots_Task:
		return withDisk(afterRemoveAllSnapshots(req), func() types.ManagedObjectReference { return req.This }, leafLive)
	case *types.PowerOffVM_Task:
		return afterPowerOffDisk(req.This)
	case *types.SuspendVM_Task:
		return afterPowerOffDisk(req.This)
	case *types.ShutdownGuest:
		return func([]byte) {
			if diskOpts.enabled {
				reconcileDisk(req.This, leafLive)
			}
		}
	case *types.CloneVM_Task:
		restore := keepSourceDisks(req.This)
		after := withDisk(afterClone(req, user), nil, leafLive)
		return func(response []byte) {
			restore()
			after(response)
		}
	case *types.RelocateVM_Task:
		return afterRelocate(req.This, req.Spec, "", "")
	case *types.ReconfigVM_Task:
		restore := beforeDiskEdit(req)
		rebuild := afterDiskChange(req)
		return func(response []byte) {
			if restore != nil {
				restore()
			}
			if succeeded(response) {
				syncToolsLocked(req.This)
			}
			if rebuild != nil {
				rebuild(response)
			}
		}
	case *types.AddHost_Task:
		return afterAddHost(req)
	case *types.AcquireGenericServiceTicket:
		return afterServiceTicket(req)
	case *types.SetCollectorPageSize:
		return afterSetPageSize(req)
	case *types.DestroyCollector:
		return afterDestroyCollector(req)
	case *types.CreateCollectorForEvents:
		return afterCreateEventCollector(req)
	}
	return nil
}

func writeRecorded(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(rec.Body.Len()))
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// sessionUsers maps session cookies to the user who logged in with them.
var sessionUsers sync.Map

func rememberUser(rec *httptest.ResponseRecorder, user string) {
	for _, c := range (&http.Response{Header: rec.Header()}).Cookies() {
		if c.Name == soap.SessionCookieName && c.Value != "" {
			sessionUsers.Store(c.Value, user)
		}
	}
}

// userOf names the user of a request's session ("vcsim" if unknown).
func userOf(r *http.Request) string {
	if c, err := r.Cookie(soap.SessionCookieName); err == nil {
		if u, ok := sessionUsers.Load(c.Value); ok {
			return u.(string)
		}
	}
	return "vcsim"
}

var taskReturnval = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

// finishedTask returns the task a *_Task response names (tasks run synchronously in this
// library, so it is finished), or nil.
func finishedTask(response []byte) *simulator.Task {
	m := taskReturnval.FindSubmatch(response)
	if m == nil {
		return nil
	}
	ref := types.ManagedObjectReference{Type: "Task", Value: string(m[1])}
	task, _ := simulator.Map.Get(ref).(*simulator.Task)
	return task
}

// succeeded reports whether a *_Task response names a task that ended in success.
func succeeded(response []byte) bool {
	task := finishedTask(response)
	if task == nil {
		return false
	}
	ok := false
	simulator.Map.WithLock(task, func() { ok = task.Info.State == types.TaskInfoStateSuccess })
	return ok
}

// taskResult returns the result of a successful task, or nil.
func taskResult(response []byte) (*simulator.Task, types.AnyType) {
	task := finishedTask(response)
	if task == nil {
		return nil, nil
	}
	var res types.AnyType
	simulator.Map.WithLock(task, func() {
		if task.Info.State == types.TaskInfoStateSuccess {
			res = task.Info.Result
		}
	})
	if res == nil {
		return task, nil
	}
	return task, res
}

// renameTask gives a task the name and descriptionId a real vCenter uses.
func renameTask(task *simulator.Task, name, descriptionID string) {
	if task == nil {
		return
	}
	simulator.Map.WithLock(task, func() {
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.name", Val: name},
			{Name: "info.descriptionId", Val: descriptionID},
		})
	})
}

// retargetTask makes a snapshot task's entity the VM, as on a real vCenter (the library
// names the snapshot, which is no ManagedEntity: pyVmomi refuses to read such a task).
func retargetTask(task *simulator.Task, snapshot types.ManagedObjectReference) {
	snap, ok := simulator.Map.Get(snapshot).(*simulator.VirtualMachineSnapshot)
	if task == nil || !ok {
		return
	}
	var vmRef types.ManagedObjectReference
	simulator.Map.WithLock(snap, func() { vmRef = snap.Vm })
	_, p := placementOf(vmRef)
	simulator.Map.WithLock(task, func() {
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.entity", Val: &vmRef},
			{Name: "info.entityName", Val: p.name},
		})
	})
}

// soapRequest encodes a request body as a SOAP envelope the library's handler accepts.
func soapRequest(body interface{}) ([]byte, error) {
	var out bytes.Buffer
	out.WriteString(xml.Header)
	env := soap.Envelope{Body: body}
	if err := xml.NewEncoder(&out).Encode(env); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// responseEnvelope is the SOAP envelope of answers the front handler writes itself.
type responseEnvelope struct {
	XMLName xml.Name    `xml:"soapenv:Envelope"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

// soapResponse encodes a methods.*Body with its Res set as a complete SOAP answer.
func soapResponse(body interface{}) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Type", "text/xml; charset=utf-8")
	var out bytes.Buffer
	out.WriteString(xml.Header)
	err := xml.NewEncoder(&out).Encode(&responseEnvelope{
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: body,
	})
	if err != nil {
		log.Printf("encoding a response: %s", err)
		rec.WriteHeader(http.StatusInternalServerError)
		return rec
	}
	rec.WriteHeader(http.StatusOK)
	rec.Body.Write(out.Bytes())
	return rec
}

// migrate serves MigrateVM_Task (missing in this library) as RelocateVM_Task to the same
// pool and host, then renames the answer and the task.
func (f *front) migrate(c *soapCall, req *types.MigrateVM_Task) *httptest.ResponseRecorder {
	relocate := &types.RelocateVM_Task{
		This:     req.This,
		Spec:     types.VirtualMachineRelocateSpec{Pool: req.Pool, Host: req.Host},
		Priority: req.Priority,
	}
	body, err := soapRequest(&methods.RelocateVM_TaskBody{Req: relocate})
	if err != nil {
		return f.pass(c, c.body)
	}
	after := afterRelocate(req.This, relocate.Spec, "MigrateVM_Task", "VirtualMachine.migrate")
	rec := f.pass(c, body)
	out := bytes.Replace(rec.Body.Bytes(), []byte("RelocateVM_TaskResponse"), []byte("MigrateVM_TaskResponse"), -1)
	if rec.Code == http.StatusOK {
		after(out)
	}
	rec.Body = bytes.NewBuffer(out)
	return rec
}
