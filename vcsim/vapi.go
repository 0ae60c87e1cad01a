package main

// The vSphere Automation API adapter: POST /api, JSON-RPC 2.0 as the vSphere Automation SDK
// for Python (vmware-vapi-runtime) speaks it, for sessions (com.vmware.cis.session) and
// tagging (com.vmware.cis.tagging.category / tag / tag_association). The library in 0.24.2
// serves only the old /rest/com/vmware/... endpoints, so each call is unwrapped from the
// typed JSON-RPC form ({"STRUCTURE":{"<name>":{...}}}, {"OPTIONAL":v}, {"SECRET":s}),
// passed in-process to the library's /rest handler (through the service's ServeMux into an
// httptest.ResponseRecorder, with the vmware-api-session-id header), and the REST answer
// ({"value": ...} or an HTTP error) is turned back into a typed result or a standard vAPI
// error (com.vmware.vapi.std.errors.*). Sessions, categories, tags and associations are
// therefore the library's own: /rest and /api see the same state.
//
// Called by main.go (installVapi after NewServer), which also puts a guard on the library's
// /rest login so that it checks the vCenter login as /sdk does. Calls the service's ServeMux
// (the /rest handler, which takes its own mutex) and simulator.Map.Get to check that a tagged object
// exists; no Map lock is held while a call passes through.

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	// vapiPattern is the exact path of the JSON-RPC endpoint.
	vapiPattern = "/api"
	// maxVapiBody bounds one JSON-RPC request.
	maxVapiBody = 1 << 20
	// maxVapiDepth bounds the nesting of typed values in a request.
	maxVapiDepth = 32

	restPrefix      = "/rest/com/vmware/cis"
	restSession     = restPrefix + "/session"
	restCategory    = restPrefix + "/tagging/category"
	restTag         = restPrefix + "/tagging/tag"
	restAssociation = restPrefix + "/tagging/tag-association"
	sessionHeader   = "vmware-api-session-id"

	schemeUserPass  = "com.vmware.vapi.std.security.user_pass"
	schemeSessionID = "com.vmware.vapi.std.security.session_id"

	structCategory  = "com.vmware.cis.tagging.category_model"
	structTag       = "com.vmware.cis.tagging.tag_model"
	structDynamicID = "com.vmware.vapi.std.dynamic_ID"
	structSession   = "com.vmware.cis.session.info"
	structMessage   = "com.vmware.vapi.std.localizable_message"
)

// Standard vAPI error kinds (com.vmware.vapi.std.errors.<kind>) the adapter answers.
const (
	errNotFound          = "not_found"
	errAlreadyExists     = "already_exists"
	errInvalidArgument   = "invalid_argument"
	errUnauthenticated   = "unauthenticated"
	errOperationNotFound = "operation_not_found"
	errInternal          = "internal_server_error"
)

// vapiAdapter serves POST /api by routing each operation to the library's /rest handler.
type vapiAdapter struct {
	rest     http.Handler // the service's ServeMux, which holds the library's /rest/ handler
	user     string       // the vCenter login, checked exactly as /sdk's Login checks it
	password string
}

// installVapi registers the JSON-RPC endpoint on the service's ServeMux.
func installVapi(svc *simulator.Service) {
	a := &vapiAdapter{rest: svc.ServeMux}
	if svc.Listen != nil && svc.Listen.User != nil {
		a.user = svc.Listen.User.Username()
		a.password, _ = svc.Listen.User.Password()
	}
	// The library's /rest login accepts any non-empty user and password: check it as /sdk does.
	lib, _ := svc.ServeMux.Handler(httptest.NewRequest(http.MethodPost, restSession, nil))
	svc.ServeMux.Handle(restSession, &restLoginGuard{next: lib, adapter: a})
	svc.ServeMux.Handle(vapiPattern, a)
}

// validLogin checks a user and password against the vCenter login.
func (a *vapiAdapter) validLogin(user, pass string) bool {
	return user != "" && pass != "" &&
		subtle.ConstantTimeCompare([]byte(user), []byte(a.user)) == 1 &&
		subtle.ConstantTimeCompare([]byte(pass), []byte(a.password)) == 1
}

// restLoginGuard sits on the exact path /rest/com/vmware/cis/session in front of the
// library's /rest handler and refuses a login (POST without ~action) with wrong credentials.
type restLoginGuard struct {
	next    http.Handler
	adapter *vapiAdapter
}

func (g *restLoginGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && r.URL.Query().Get("~action") == "" {
		if u, p, ok := r.BasicAuth(); !ok || !g.adapter.validLogin(u, p) {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	g.next.ServeHTTP(w, r)
}

// vapiError is a standard vAPI error on its way to the client.
type vapiError struct {
	kind    string
	message string
}

func newVapiError(kind, format string, args ...interface{}) *vapiError {
	return &vapiError{kind: kind, message: fmt.Sprintf(format, args...)}
}

// typed renders the error as the JSON-RPC typed ERROR value the SDK converts to
// com.vmware.vapi.std.errors_client.<Kind>.
func (e *vapiError) typed() interface{} {
	msg := map[string]interface{}{"STRUCTURE": map[string]interface{}{structMessage: map[string]interface{}{
		"id":              "vcsim.vapi." + e.kind,
		"default_message": e.message,
		"args":            []interface{}{},
		"params":          optional(nil),
		"localized":       optional(nil),
	}}}
	fields := map[string]interface{}{
		"messages":   []interface{}{msg},
		"data":       optional(nil),
		"error_type": optional(strings.ToUpper(e.kind)),
	}
	if e.kind == errUnauthenticated {
		fields["challenge"] = optional(`Basic realm="VAPI endpoint",service="com.vmware.vapi.endpoint"`)
	}
	return map[string]interface{}{"ERROR": map[string]interface{}{"com.vmware.vapi.std.errors." + e.kind: fields}}
}

func optional(v interface{}) interface{} { return map[string]interface{}{"OPTIONAL": v} }

func structure(name string, fields map[string]interface{}) interface{} {
	return map[string]interface{}{"STRUCTURE": map[string]interface{}{name: fields}}
}

// rpcRequest is one JSON-RPC 2.0 "invoke" request as the SDK sends it.
type rpcRequest struct {
	JSONRPC string          `json:"jsonrpc"`
	Method  string          `json:"method"`
	ID      json.RawMessage `json:"id"`
	Params  struct {
		ServiceID   string          `json:"serviceId"`
		OperationID string          `json:"operationId"`
		Input       json.RawMessage `json:"input"`
		Ctx         struct {
			SecurityCtx map[string]interface{} `json:"securityCtx"`
		} `json:"ctx"`
	} `json:"params"`
}

func (a *vapiAdapter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxVapiBody))
	if err != nil {
		writeRPC(w, nil, nil, rpcProtocolError(-32700, "Parse error: "+err.Error()))
		return
	}
	var req rpcRequest
	if err = json.Unmarshal(body, &req); err != nil {
		writeRPC(w, nil, nil, rpcProtocolError(-32700, "Parse error: "+err.Error()))
		return
	}
	if req.JSONRPC != "2.0" || len(req.ID) == 0 {
		writeRPC(w, nil, nil, rpcProtocolError(-32600, "Invalid Request"))
		return
	}
	if req.Method != "invoke" {
		writeRPC(w, req.ID, nil, rpcProtocolError(-32601, "Method not found: "+req.Method))
		return
	}
	input, verr := decodeInput(req.Params.Input)
	var output interface{}
	if verr == nil {
		output, verr = a.invoke(req.Params.ServiceID, req.Params.OperationID, input, req.Params.Ctx.SecurityCtx)
	}
	result := map[string]interface{}{}
	if verr != nil {
		result["error"] = verr.typed()
	} else {
		result["output"] = output
	}
	writeRPC(w, req.ID, result, nil)
}

func rpcProtocolError(code int, message string) interface{} {
	return map[string]interface{}{"code": code, "message": message}
}

// writeRPC answers 200 with a JSON-RPC response (the SDK raises on any other HTTP status).
func writeRPC(w http.ResponseWriter, id json.RawMessage, result, protoErr interface{}) {
	resp := map[string]interface{}{"jsonrpc": "2.0", "id": nil}
	if len(id) > 0 {
		resp["id"] = id
	}
	if protoErr != nil {
		resp["error"] = protoErr
	} else {
		resp["result"] = result
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if err := json.NewEncoder(w).Encode(resp); err != nil {
		log.Printf("vapi: writing a reply: %s", err)
	}
}

// decodeInput unwraps the operation input ({"STRUCTURE":{"operation-input":{...}}}) into
// plain JSON values: the shapes the /rest handlers read.
func decodeInput(raw json.RawMessage) (map[string]interface{}, *vapiError) {
	if len(raw) == 0 || string(raw) == "null" {
		return map[string]interface{}{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v interface{}
	if err := dec.Decode(&v); err != nil {
		return nil, newVapiError(errInvalidArgument, "input: %s", err)
	}
	plain, err := untype(v, 0)
	if err != nil {
		return nil, newVapiError(errInvalidArgument, "input: %s", err)
	}
	if plain == nil {
		return map[string]interface{}{}, nil
	}
	in, ok := plain.(map[string]interface{})
	if !ok {
		return nil, newVapiError(errInvalidArgument, "input: not a structure")
	}
	return in, nil
}

// untype turns a typed JSON-RPC data value into plain JSON: structures and errors become
// objects of their fields, optionals their value (unset: nil, and the field is dropped),
// secrets and binaries their string.
func untype(v interface{}, depth int) (interface{}, error) {
	if depth > maxVapiDepth {
		return nil, fmt.Errorf("nested deeper than %d", maxVapiDepth)
	}
	switch t := v.(type) {
	case []interface{}:
		out := make([]interface{}, 0, len(t))
		for _, e := range t {
			p, err := untype(e, depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, p)
		}
		return out, nil
	case map[string]interface{}:
		if len(t) != 1 {
			return nil, fmt.Errorf("a typed value has exactly one key, got %d", len(t))
		}
		for kind, inner := range t {
			switch kind {
			case "STRUCTURE", "ERROR":
				named, ok := inner.(map[string]interface{})
				if !ok || len(named) != 1 {
					return nil, fmt.Errorf("%s: want one named structure", kind)
				}
				for _, f := range named {
					fields, ok := f.(map[string]interface{})
					if !ok {
						return nil, fmt.Errorf("%s: fields are not an object", kind)
					}
					out := make(map[string]interface{}, len(fields))
					for name, fv := range fields {
						p, err := untype(fv, depth+1)
						if err != nil {
							return nil, err
						}
						if p != nil {
							out[name] = p
						}
					}
					return out, nil
				}
			case "OPTIONAL":
				if inner == nil {
					return nil, nil
				}
				return untype(inner, depth+1)
			case "SECRET", "BINARY":
				return inner, nil
			default:
				return nil, fmt.Errorf("unknown value type %q", kind)
			}
		}
	}
	return v, nil
}

// invoke runs one operation; output is the typed result value.
func (a *vapiAdapter) invoke(service, op string, in map[string]interface{}, sec map[string]interface{}) (out interface{}, verr *vapiError) {
	defer func() {
		if p := recover(); p != nil {
			log.Printf("vapi: %s.%s: panic: %v", service, op, p)
			out, verr = nil, newVapiError(errInternal, "internal error in %s.%s", service, op)
		}
	}()
	if service == "com.vmware.cis.session" && op == "create" {
		return a.sessionCreate(sec)
	}
	if !knownOperation(service, op) {
		return nil, newVapiError(errOperationNotFound, "operation %s.%s is not served by the simulator", service, op)
	}
	scheme, _ := sec["schemeId"].(string)
	sid, _ := sec["sessionId"].(string)
	if scheme != schemeSessionID || sid == "" {
		return nil, newVapiError(errUnauthenticated, "this operation needs a session (security scheme %s)", schemeSessionID)
	}
	c := &restCaller{rest: a.rest, session: sid}
	switch service {
	case "com.vmware.cis.session":
		return c.sessionOp(op)
	case "com.vmware.cis.tagging.category":
		return c.category(op, in)
	case "com.vmware.cis.tagging.tag":
		return c.tag(op, in)
	default:
		return c.association(op, in)
	}
}

// vapiOperations lists what the adapter serves, by service.
var vapiOperations = map[string][]string{
	"com.vmware.cis.session":                 {"create", "delete", "get"},
	"com.vmware.cis.tagging.category":        {"list", "get", "create", "delete"},
	"com.vmware.cis.tagging.tag":             {"list", "get", "create", "delete", "list_tags_for_category"},
	"com.vmware.cis.tagging.tag_association": {"attach", "detach", "list_attached_tags", "list_attached_objects"},
}

func knownOperation(service, op string) bool {
	for _, o := range vapiOperations[service] {
		if o == op {
			return true
		}
	}
	return false
}

// sessionCreate checks user_pass credentials and opens a library /rest session.
func (a *vapiAdapter) sessionCreate(sec map[string]interface{}) (interface{}, *vapiError) {
	scheme, _ := sec["schemeId"].(string)
	user, _ := sec["userName"].(string)
	pass, _ := sec["password"].(string)
	if scheme != schemeUserPass {
		return nil, newVapiError(errUnauthenticated, "session create needs security scheme %s", schemeUserPass)
	}
	if !a.validLogin(user, pass) {
		return nil, newVapiError(errUnauthenticated, "Authentication required.")
	}
	c := &restCaller{rest: a.rest, basicUser: user, basicPass: pass}
	var id string
	if verr := c.do(http.MethodPost, restSession, "", nil, &id); verr != nil {
		return nil, verr
	}
	if id == "" {
		return nil, newVapiError(errInternal, "the session service returned no id")
	}
	return map[string]interface{}{"SECRET": id}, nil
}

// restCaller passes calls to the library's /rest handler in-process.
type restCaller struct {
	rest                 http.Handler
	session              string
	basicUser, basicPass string
}

// do sends one REST request; a 2xx answer's "value" is decoded into value (if not nil).
func (c *restCaller) do(method, path, query string, body interface{}, value interface{}) *vapiError {
	var rd io.Reader = http.NoBody
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return newVapiError(errInternal, "encoding a request: %s", err)
		}
		rd = bytes.NewReader(b)
	}
	u := &url.URL{Path: path, RawQuery: query}
	req := httptest.NewRequest(method, u.RequestURI(), rd)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("vmware-use-header-authn", "true")
	if c.session != "" {
		req.Header.Set(sessionHeader, c.session)
	}
	if c.basicUser != "" {
		req.SetBasicAuth(c.basicUser, c.basicPass)
	}
	rec := httptest.NewRecorder()
	c.rest.ServeHTTP(rec, req)
	switch {
	case rec.Code == http.StatusUnauthorized:
		return newVapiError(errUnauthenticated, "Authentication required.")
	case rec.Code == http.StatusNotFound:
		return newVapiError(errNotFound, "no such object")
	case rec.Code == http.StatusBadRequest:
		var e struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(rec.Body.Bytes(), &e)
		kind := strings.TrimPrefix(e.Type, "com.vmware.vapi.std.errors.")
		if kind == "" || kind == e.Type {
			kind = errInvalidArgument
		}
		return newVapiError(kind, "%s", strings.Replace(kind, "_", " ", -1))
	case rec.Code < 200 || rec.Code > 299:
		return newVapiError(errInternal, "the /rest handler answered %d: %s", rec.Code,
			strings.TrimSpace(rec.Body.String()))
	}
	if value == nil || rec.Body.Len() == 0 {
		return nil
	}
	var env struct {
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil {
		return newVapiError(errInternal, "decoding the /rest answer: %s", err)
	}
	if len(env.Value) == 0 || string(env.Value) == "null" {
		return nil
	}
	if err := json.Unmarshal(env.Value, value); err != nil {
		return newVapiError(errInternal, "decoding the /rest answer: %s", err)
	}
	return nil
}

// idPath is base + "/id:<id>"; an id that is empty or holds a path separator names nothing.
func idPath(base, kind, id string) (string, *vapiError) {
	if id == "" || strings.ContainsAny(id, "/?#") {
		return "", newVapiError(errNotFound, "%s %q not found", kind, id)
	}
	return base + "/id:" + id, nil
}

// stringArg is the named string argument, or an invalid_argument error.
func stringArg(in map[string]interface{}, name string) (string, *vapiError) {
	s, ok := in[name].(string)
	if !ok {
		return "", newVapiError(errInvalidArgument, "argument %s: want a string", name)
	}
	return s, nil
}

// objectArg is a DynamicID argument in the /rest form {"type": ..., "id": ...}.
func objectArg(in map[string]interface{}, name string) (map[string]string, *vapiError) {
	m, ok := in[name].(map[string]interface{})
	if !ok {
		return nil, newVapiError(errInvalidArgument, "argument %s: want a DynamicID", name)
	}
	typ, _ := m["type"].(string)
	id, _ := m["id"].(string)
	if typ == "" || id == "" {
		return nil, newVapiError(errInvalidArgument, "argument %s: type and id must be set", name)
	}
	return map[string]string{"type": typ, "id": id}, nil
}

func stringList(v []string) []interface{} {
	out := make([]interface{}, 0, len(v))
	for _, s := range v {
		out = append(out, s)
	}
	return out
}

// restTime re-formats a /rest time stamp as the RFC 3339 UTC form the SDK parses.
func restTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}

func (c *restCaller) sessionOp(op string) (interface{}, *vapiError) {
	switch op {
	case "delete":
		return nil, c.do(http.MethodDelete, restSession, "", nil, nil)
	default: // get
		var info struct {
			User         string    `json:"user"`
			Created      time.Time `json:"created_time"`
			LastAccessed time.Time `json:"last_accessed_time"`
		}
		if verr := c.do(http.MethodGet, restSession, "", nil, &info); verr != nil {
			return nil, verr
		}
		return structure(structSession, map[string]interface{}{
			"user":               info.User,
			"created_time":       restTime(info.Created),
			"last_accessed_time": restTime(info.LastAccessed),
		}), nil
	}
}

// restCategoryModel and restTagModel are what the /rest handler answers for one object.
type restCategoryModel struct {
	ID              string   `json:"id"`
	Name            string   `json:"name"`
	Description     string   `json:"description"`
	Cardinality     string   `json:"cardinality"`
	AssociableTypes []string `json:"associable_types"`
	UsedBy          []string `json:"used_by"`
}

type restTagModel struct {
	ID          string   `json:"id"`
	Name        string   `json:"name"`
	Description string   `json:"description"`
	CategoryID  string   `json:"category_id"`
	UsedBy      []string `json:"used_by"`
}

func (c *restCaller) getCategory(id string) (*restCategoryModel, *vapiError) {
	p, verr := idPath(restCategory, "category", id)
	if verr != nil {
		return nil, verr
	}
	var m restCategoryModel
	if verr = c.do(http.MethodGet, p, "", nil, &m); verr != nil {
		if verr.kind == errNotFound {
			verr.message = fmt.Sprintf("category %q not found", id)
		}
		return nil, verr
	}
	return &m, nil
}

func (c *restCaller) getTag(id string) (*restTagModel, *vapiError) {
	p, verr := idPath(restTag, "tag", id)
	if verr != nil {
		return nil, verr
	}
	var m restTagModel
	if verr = c.do(http.MethodGet, p, "", nil, &m); verr != nil {
		if verr.kind == errNotFound {
			verr.message = fmt.Sprintf("tag %q not found", id)
		}
		return nil, verr
	}
	return &m, nil
}

func (c *restCaller) listIDs(path string) (interface{}, *vapiError) {
	var ids []string
	if verr := c.do(http.MethodGet, path, "", nil, &ids); verr != nil {
		return nil, verr
	}
	return stringList(ids), nil
}

func (c *restCaller) category(op string, in map[string]interface{}) (interface{}, *vapiError) {
	switch op {
	case "list":
		return c.listIDs(restCategory)
	case "create":
		spec, ok := in["create_spec"].(map[string]interface{})
		if !ok {
			return nil, newVapiError(errInvalidArgument, "argument create_spec: want a Category.CreateSpec")
		}
		name, _ := spec["name"].(string)
		card, _ := spec["cardinality"].(string)
		if strings.TrimSpace(name) == "" {
			return nil, newVapiError(errInvalidArgument, "category name must not be empty")
		}
		if card != "SINGLE" && card != "MULTIPLE" {
			return nil, newVapiError(errInvalidArgument, "cardinality must be SINGLE or MULTIPLE, got %q", card)
		}
		var id string
		if verr := c.do(http.MethodPost, restCategory, "", map[string]interface{}{"create_spec": spec}, &id); verr != nil {
			if verr.kind == errAlreadyExists {
				verr.message = fmt.Sprintf("a category named %q already exists", name)
			}
			return nil, verr
		}
		return id, nil
	}
	id, verr := stringArg(in, "category_id")
	if verr != nil {
		return nil, verr
	}
	if op == "delete" {
		return nil, c.deleteOne(restCategory, "category", id)
	}
	m, verr := c.getCategory(id) // get
	if verr != nil {
		return nil, verr
	}
	return structure(structCategory, map[string]interface{}{
		"id":               m.ID,
		"name":             m.Name,
		"description":      m.Description,
		"cardinality":      m.Cardinality,
		"associable_types": stringList(m.AssociableTypes),
		"used_by":          stringList(m.UsedBy),
	}), nil
}

func (c *restCaller) tag(op string, in map[string]interface{}) (interface{}, *vapiError) {
	switch op {
	case "list":
		return c.listIDs(restTag)
	case "create":
		spec, ok := in["create_spec"].(map[string]interface{})
		if !ok {
			return nil, newVapiError(errInvalidArgument, "argument create_spec: want a Tag.CreateSpec")
		}
		name, _ := spec["name"].(string)
		catID, _ := spec["category_id"].(string)
		if strings.TrimSpace(name) == "" {
			return nil, newVapiError(errInvalidArgument, "tag name must not be empty")
		}
		if _, verr := c.getCategory(catID); verr != nil {
			return nil, verr
		}
		var id string
		if verr := c.do(http.MethodPost, restTag, "", map[string]interface{}{"create_spec": spec}, &id); verr != nil {
			if verr.kind == errAlreadyExists {
				verr.message = fmt.Sprintf("a tag named %q already exists in category %q", name, catID)
			}
			return nil, verr
		}
		return id, nil
	case "list_tags_for_category":
		catID, verr := stringArg(in, "category_id")
		if verr != nil {
			return nil, verr
		}
		if _, verr = c.getCategory(catID); verr != nil {
			return nil, verr
		}
		var ids []string
		p, _ := idPath(restTag, "category", catID)
		if verr = c.do(http.MethodPost, p, "~action=list-tags-for-category", nil, &ids); verr != nil {
			return nil, verr
		}
		return stringList(ids), nil
	}
	id, verr := stringArg(in, "tag_id")
	if verr != nil {
		return nil, verr
	}
	if op == "delete" {
		return nil, c.deleteOne(restTag, "tag", id)
	}
	m, verr := c.getTag(id) // get
	if verr != nil {
		return nil, verr
	}
	return structure(structTag, map[string]interface{}{
		"id":          m.ID,
		"category_id": m.CategoryID,
		"name":        m.Name,
		"description": m.Description,
		"used_by":     stringList(m.UsedBy),
	}), nil
}

// deleteOne deletes the category or tag (kind) with this id through its /rest path.
func (c *restCaller) deleteOne(base, kind, id string) *vapiError {
	p, verr := idPath(base, kind, id)
	if verr != nil {
		return verr
	}
	if verr = c.do(http.MethodDelete, p, "", nil, nil); verr != nil && verr.kind == errNotFound {
		verr.message = fmt.Sprintf("%s %q not found", kind, id)
	}
	return verr
}

func (c *restCaller) attachedTags(obj map[string]string) ([]string, *vapiError) {
	var ids []string
	verr := c.do(http.MethodPost, restAssociation, "~action=list-attached-tags",
		map[string]interface{}{"object_id": obj}, &ids)
	return ids, verr
}

func (c *restCaller) association(op string, in map[string]interface{}) (interface{}, *vapiError) {
	if op == "list_attached_tags" {
		obj, verr := objectArg(in, "object_id")
		if verr != nil {
			return nil, verr
		}
		ids, verr := c.attachedTags(obj)
		if verr != nil {
			return nil, verr
		}
		return stringList(ids), nil
	}
	tagID, verr := stringArg(in, "tag_id")
	if verr != nil {
		return nil, verr
	}
	tag, verr := c.getTag(tagID)
	if verr != nil {
		return nil, verr
	}
	p, _ := idPath(restAssociation, "tag", tag.ID)
	if op == "list_attached_objects" {
		var objs []struct {
			Type string `json:"type"`
			ID   string `json:"id"`
		}
		if verr = c.do(http.MethodPost, p, "~action=list-attached-objects", map[string]interface{}{}, &objs); verr != nil {
			return nil, verr
		}
		out := make([]interface{}, 0, len(objs))
		for _, o := range objs {
			out = append(out, structure(structDynamicID, map[string]interface{}{"type": o.Type, "id": o.ID}))
		}
		return out, nil
	}
	obj, verr := objectArg(in, "object_id")
	if verr != nil {
		return nil, verr
	}
	if op == "attach" {
		if verr = c.checkAttach(tag, obj); verr != nil {
			return nil, verr
		}
	}
	action := "~action=" + op // attach / detach
	if verr = c.do(http.MethodPost, p, action, map[string]interface{}{"object_id": obj}, nil); verr != nil {
		return nil, verr
	}
	return nil, nil
}

// checkAttach refuses what vCenter refuses and the library does not check: an object that
// does not exist, a type the category is not associable with, and a second tag of a
// SINGLE-cardinality category on one object ("Tagging cardinality violation").
func (c *restCaller) checkAttach(tag *restTagModel, obj map[string]string) *vapiError {
	ref := types.ManagedObjectReference{Type: obj["type"], Value: obj["id"]}
	if simulator.Map.Get(ref) == nil {
		return newVapiError(errNotFound, "object %s:%s not found", ref.Type, ref.Value)
	}
	cat, verr := c.getCategory(tag.CategoryID)
	if verr != nil {
		return verr
	}
	if len(cat.AssociableTypes) > 0 {
		ok := false
		for _, t := range cat.AssociableTypes {
			if t == ref.Type {
				ok = true
			}
		}
		if !ok {
			return newVapiError(errInvalidArgument, "category %q is not associable with type %s", cat.Name, ref.Type)
		}
	}
	if cat.Cardinality != "SINGLE" {
		return nil
	}
	attached, verr := c.attachedTags(obj)
	if verr != nil {
		return verr
	}
	for _, id := range attached {
		if id == tag.ID {
			return nil // attaching again changes nothing
		}
	}
	for _, id := range attached {
		other, verr := c.getTag(id)
		if verr == nil && other.CategoryID == cat.ID {
			return newVapiError(errInvalidArgument, "Tagging cardinality violation: category %q allows one tag per object", cat.Name)
		}
	}
	return nil
}
