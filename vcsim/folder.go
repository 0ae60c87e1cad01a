package main

// Datastore file access (/folder/<path>?dcPath=&dsName=) with authentication, as on ESXi and
// vCenter. The library serves /folder with http.FileServer (Range supported) and checks
// nothing; here a request must carry one of:
//   - a valid vCenter session cookie (vmware_soap_session), as a client logged in to /sdk has;
//   - a generic service ticket from SessionManager.AcquireGenericServiceTicket with an
//     HttpServiceRequestSpec, sent as cookie vmware_cgi_ticket: valid once, only for the URL
//     (path and dsName; dcPath too if the spec gave one) and HTTP method it was acquired for,
//     and only for ticketTTL;
//   - HTTP Basic authentication with the vCenter login.
// Nothing: 401 with a WWW-Authenticate challenge. A ticket that is unknown, used, expired or
// bound to another request: 403. A VM's files whose disk is marked
// vcsim.disk.inaccessible = TRUE: 404, as for a datastore the host cannot reach.

import (
	"bytes"
	"crypto/subtle"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	folderPrefix = "/folder/"
	cgiTicket    = "vmware_cgi_ticket"
	ticketTTL    = 10 * time.Minute
)

// ticketDelay is how long each AcquireGenericServiceTicket answer waits (-ticket-delay):
// the round trip to a real vCenter, tens of milliseconds where the library answers in about
// one, so that code fetching a ticket per datastore read shows its cost in benchmarks.
var ticketDelay time.Duration

// vCenter login, for Basic authentication on /folder.
var vcLogin struct{ user, password string }

type serviceTicket struct {
	method  string // HTTP method, upper case
	path    string // URL path, cleaned
	dsName  string
	dcPath  string // "" when the spec gave none
	expires time.Time
}

var tickets = struct {
	sync.Mutex
	m map[string]serviceTicket
}{m: map[string]serviceTicket{}}

var ticketID = regexp.MustCompile(`<id>([^<]+)</id>`)

// afterServiceTicket records a ticket the library issued for an HTTP request spec.
func afterServiceTicket(req *types.AcquireGenericServiceTicket) func([]byte) {
	spec, ok := req.Spec.(*types.SessionManagerHttpServiceRequestSpec)
	if !ok {
		return nil
	}
	return func(response []byte) {
		m := ticketID.FindSubmatch(response)
		if m == nil {
			return
		}
		u, err := url.Parse(spec.Url)
		if err != nil {
			return
		}
		method := strings.ToUpper(strings.TrimPrefix(spec.Method, "http"))
		if method == "" {
			method = http.MethodGet
		}
		q := u.Query()
		t := serviceTicket{
			method:  method,
			path:    path.Clean("/" + u.Path),
			dsName:  q.Get("dsName"),
			dcPath:  q.Get("dcPath"),
			expires: time.Now().Add(ticketTTL),
		}
		tickets.Lock()
		now := time.Now()
		for id, old := range tickets.m {
			if now.After(old.expires) {
				delete(tickets.m, id)
			}
		}
		tickets.m[string(m[1])] = t
		tickets.Unlock()
	}
}

// useTicket consumes a ticket if it was issued for this request.
func useTicket(id string, r *http.Request) bool {
	tickets.Lock()
	defer tickets.Unlock()
	t, ok := tickets.m[id]
	if !ok {
		return false
	}
	q := r.URL.Query()
	match := t.method == r.Method && t.path == path.Clean(r.URL.Path) && t.dsName == q.Get("dsName") &&
		(t.dcPath == "" || t.dcPath == q.Get("dcPath"))
	if !match {
		return false
	}
	delete(tickets.m, id) // valid once, whatever happens next
	return time.Now().Before(t.expires)
}

// folderGuard authenticates /folder requests before the library serves them.
type folderGuard struct {
	next http.Handler
}

func (g *folderGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, folderPrefix) {
		g.next.ServeHTTP(w, r)
		return
	}
	switch folderAuth(g.next, r) {
	case http.StatusUnauthorized:
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "authentication required", http.StatusUnauthorized)
		return
	case http.StatusForbidden:
		http.Error(w, "ticket not valid for this request", http.StatusForbidden)
		return
	}
	rel := strings.TrimPrefix(r.URL.Path, folderPrefix)
	if diskOpts.enabled && diskInaccessible(r.URL.Query().Get("dsName"), rel) {
		http.NotFound(w, r)
		return
	}
	g.next.ServeHTTP(w, r)
}

// folderAuth answers 200 when the request may proceed, 401 or 403 otherwise.
func folderAuth(next http.Handler, r *http.Request) int {
	if c, err := r.Cookie(cgiTicket); err == nil && c.Value != "" {
		if useTicket(c.Value, r) {
			return http.StatusOK
		}
		return http.StatusForbidden
	}
	if user, pass, ok := r.BasicAuth(); ok {
		u := subtle.ConstantTimeCompare([]byte(user), []byte(vcLogin.user))
		p := subtle.ConstantTimeCompare([]byte(pass), []byte(vcLogin.password))
		if u&p == 1 && vcLogin.user != "" {
			return http.StatusOK
		}
		return http.StatusUnauthorized
	}
	if c, err := r.Cookie(soap.SessionCookieName); err == nil && c.Value != "" && sessionValid(next, c) {
		return http.StatusOK
	}
	return http.StatusUnauthorized
}

// sessionValid asks the library whether a session cookie is logged in: CurrentTime needs a
// session (NotAuthenticated otherwise).
func sessionValid(next http.Handler, cookie *http.Cookie) bool {
	body, err := soapRequest(&methods.CurrentTimeBody{Req: &types.CurrentTime{
		This: types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"},
	}})
	if err != nil {
		return false
	}
	req := httptest.NewRequest(http.MethodPost, "/sdk", bytes.NewReader(body))
	req.Header.Set("Content-Type", "text/xml; charset=utf-8")
	req.Header.Set("SOAPAction", "urn:vim25/6.7")
	req.AddCookie(cookie)
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, req)
	return rec.Code == http.StatusOK
}
