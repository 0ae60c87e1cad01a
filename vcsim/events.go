package main

// Event collectors that filter as a real vCenter does. The library matches `eventTypeId`
// only against Go class names, so EventEx / ExtendedEvent with an eventTypeId such as
// com.vmware.vc.vm.VmStateRevertedToSnapshot never match; it also fills a new collector's
// page with the newest event followed by the oldest ones, and ignores time filters.
//
// Fixes, without replacing the EventManager (the library type-asserts it):
//   - after CreateCollectorForEvents succeeds, the collector's page is rebuilt from the
//     manager's history with matchesSpec (newest first, like later posts keep it);
//   - QueryEvents is served through a temporary collector built the same way;
//   - every EventEx / ExtendedEvent is posted (by us or a client's PostEvent) with the filters
//     of the collectors it matches by eventTypeId widened for that one post.
//
// The library keeps collectors and pages in unexported fields; they are reached through
// reflect (read/write of unexported fields), always under the EventManager's lock.

import (
	"container/ring"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"sync"
	"time"
	"unsafe"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// maxHistory is the library's event history size (maxPageSize in event_manager.go).
const maxHistory = 1000

// exMu serialises EventEx posts so a widened filter never sees another EventEx.
var exMu sync.Mutex

// field returns a settable view of a (possibly unexported) struct field.
func unexportedField(structPtr interface{}, name string) reflect.Value {
	v := reflect.ValueOf(structPtr).Elem().FieldByName(name)
	if !v.IsValid() {
		return v
	}
	return reflect.NewAt(v.Type(), unsafe.Pointer(v.UnsafeAddr())).Elem()
}

// eventCollectors lists the EventManager's collectors; the caller holds its lock.
func eventCollectors(em *simulator.EventManager) map[types.ManagedObjectReference]*simulator.EventHistoryCollector {
	out := map[types.ManagedObjectReference]*simulator.EventHistoryCollector{}
	v := unexportedField(em, "collectors")
	if !v.IsValid() {
		return out
	}
	iter := v.MapRange()
	for iter.Next() {
		if c, ok := iter.Value().Interface().(*simulator.EventHistoryCollector); ok {
			out[iter.Key().Interface().(types.ManagedObjectReference)] = c
		}
	}
	return out
}

// history returns the manager's events, newest first; the caller holds its lock.
func eventHistory(em *simulator.EventManager) []types.BaseEvent {
	v := unexportedField(em, "page")
	if !v.IsValid() {
		return nil
	}
	r, ok := v.Interface().(*ring.Ring)
	if !ok || r == nil {
		return nil
	}
	out := make([]types.BaseEvent, 0, 64)
	for i, n := 0, r.Len(); i < n; i++ {
		if ev, isEvent := r.Value.(types.BaseEvent); isEvent {
			out = append(out, ev)
		}
		r = r.Next()
	}
	return out
}

// classNames lists an event's class and base classes (embedded structs), e.g.
// VmPoweredOnEvent, VmEvent, Event.
func classNames(ev types.BaseEvent) []string {
	var names []string
	t := reflect.TypeOf(ev)
	for depth := 0; t != nil && depth < 16; depth++ {
		if t.Kind() == reflect.Ptr {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct {
			break
		}
		names = append(names, t.Name())
		if t.NumField() == 0 || !t.Field(0).Anonymous {
			break
		}
		t = t.Field(0).Type
	}
	return names
}

// extendedTypeID is the eventTypeId an EventEx or ExtendedEvent carries, or "".
func extendedTypeID(ev types.BaseEvent) string {
	switch e := ev.(type) {
	case *types.EventEx:
		return e.EventTypeId
	case *types.ExtendedEvent:
		return e.EventTypeId
	}
	return ""
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// classMatch: the filter's eventTypeId names the event's class or a base class.
func classMatch(ev types.BaseEvent, ids []string) bool {
	if len(ids) == 0 {
		return true
	}
	for _, n := range classNames(ev) {
		if containsString(ids, n) {
			return true
		}
	}
	return false
}

// typeMatch: class match, or the EventEx/ExtendedEvent's own eventTypeId is listed.
func typeMatch(ev types.BaseEvent, ids []string) bool {
	if classMatch(ev, ids) {
		return true
	}
	id := extendedTypeID(ev)
	return id != "" && containsString(ids, id)
}

// eventEntities lists the entities an event is about.
func eventEntities(ev types.BaseEvent) []types.ManagedObjectReference {
	e := ev.GetEvent()
	var refs []types.ManagedObjectReference
	if e.Vm != nil {
		refs = append(refs, e.Vm.Vm)
	}
	if e.Host != nil {
		refs = append(refs, e.Host.Host)
	}
	if e.ComputeResource != nil {
		refs = append(refs, e.ComputeResource.ComputeResource)
	}
	if e.Ds != nil {
		refs = append(refs, e.Ds.Datastore)
	}
	if e.Net != nil {
		refs = append(refs, e.Net.Network)
	}
	if e.Dvs != nil {
		refs = append(refs, e.Dvs.Dvs)
	}
	if e.Datacenter != nil {
		refs = append(refs, e.Datacenter.Datacenter)
	}
	return refs
}

// descendants returns the inventory below root (not root itself), bounded.
func descendants(root types.ManagedObjectReference) map[types.ManagedObjectReference]bool {
	seen := map[types.ManagedObjectReference]bool{}
	queue := []types.ManagedObjectReference{root}
	for len(queue) > 0 && len(seen) < 200000 {
		ref := queue[0]
		queue = queue[1:]
		var children []types.ManagedObjectReference
		switch x := simulator.Map.Get(ref).(type) {
		case *simulator.Datacenter:
			children = []types.ManagedObjectReference{x.VmFolder, x.HostFolder, x.DatastoreFolder, x.NetworkFolder}
		case *simulator.Folder:
			children = x.ChildEntity
		case *simulator.ClusterComputeResource:
			children = append(append(children, x.Host...), derefs(x.ResourcePool)...)
		case *mo.ComputeResource:
			children = append(append(children, x.Host...), derefs(x.ResourcePool)...)
		case *simulator.ResourcePool:
			children = append(append(children, x.ResourcePool.ResourcePool...), x.Vm...)
		case *simulator.VirtualApp:
			children = append(append(children, x.VirtualApp.ResourcePool.ResourcePool...), x.Vm...)
		case *simulator.HostSystem:
			children = x.Vm
		}
		for _, c := range children {
			if !seen[c] && c != root {
				seen[c] = true
				queue = append(queue, c)
			}
		}
	}
	return seen
}

func derefs(ref *types.ManagedObjectReference) []types.ManagedObjectReference {
	if ref == nil {
		return nil
	}
	return []types.ManagedObjectReference{*ref}
}

// matcher evaluates one filter spec against events (the descendant set is computed once).
type matcher struct {
	spec  types.EventFilterSpec
	root  types.ManagedObjectReference
	below map[types.ManagedObjectReference]bool
}

func newMatcher(spec types.EventFilterSpec) *matcher {
	m := &matcher{spec: spec, root: rootFolder()}
	if spec.Entity != nil && spec.Entity.Recursion != types.EventFilterSpecRecursionOptionSelf {
		m.below = descendants(spec.Entity.Entity)
	}
	return m
}

func rootFolder() types.ManagedObjectReference {
	return simulator.Map.Get(types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}).(*simulator.ServiceInstance).Content.RootFolder
}

func (m *matcher) match(ev types.BaseEvent) bool {
	if !typeMatch(ev, m.spec.EventTypeId) {
		return false
	}
	e := ev.GetEvent()
	if t := m.spec.Time; t != nil {
		if t.BeginTime != nil && e.CreatedTime.Before(*t.BeginTime) {
			return false
		}
		if t.EndTime != nil && e.CreatedTime.After(*t.EndTime) {
			return false
		}
	}
	if m.spec.EventChainId != 0 && e.ChainId != m.spec.EventChainId {
		return false
	}
	if u := m.spec.UserName; u != nil && len(u.UserList) > 0 && !containsString(u.UserList, e.UserName) {
		return false
	}
	return m.entityMatch(ev)
}

func (m *matcher) entityMatch(ev types.BaseEvent) bool {
	spec := m.spec.Entity
	if spec == nil {
		return true
	}
	self, child := false, false
	for _, ref := range eventEntities(ev) {
		if ref == spec.Entity {
			self = true
		}
		if m.below[ref] {
			child = true
		}
	}
	switch spec.Recursion {
	case types.EventFilterSpecRecursionOptionSelf:
		return self || spec.Entity == m.root
	case types.EventFilterSpecRecursionOptionChildren:
		return child
	default: // all
		return self || child || spec.Entity == m.root
	}
}

// rebuildPage refills a collector's page from the history with matchesSpec, newest first;
// the caller holds the EventManager's lock.
func rebuildPage(em *simulator.EventManager, c *simulator.EventHistoryCollector, size int) {
	spec, ok := c.Filter.(types.EventFilterSpec)
	if !ok {
		return
	}
	pageField := unexportedField(c, "page")
	if !pageField.IsValid() {
		return
	}
	old, ok := pageField.Interface().(*ring.Ring)
	if !ok || old == nil {
		return
	}
	if size <= 0 {
		size = old.Len()
	}
	m := newMatcher(spec)
	var picked []types.BaseEvent
	for _, ev := range eventHistory(em) {
		if len(picked) == size {
			break
		}
		if m.match(ev) {
			picked = append(picked, ev)
		}
	}
	page := ring.New(size)
	r := page
	for _, ev := range picked {
		r.Value = ev
		r = r.Next()
	}
	simulator.Map.WithLock(c, func() {
		pageField.Set(reflect.ValueOf(page))
		if pos := unexportedField(c, "pos"); pos.IsValid() {
			pos.SetInt(0)
		}
	})
}

var collectorReturnval = regexp.MustCompile(`<returnval type="EventHistoryCollector">([^<]+)</returnval>`)

func afterCreateEventCollector(req *types.CreateCollectorForEvents) func([]byte) {
	return func(response []byte) {
		m := collectorReturnval.FindSubmatch(response)
		if m == nil {
			return
		}
		fixCollector(types.ManagedObjectReference{Type: "EventHistoryCollector", Value: string(m[1])}, 0)
	}
}

// fixCollector rebuilds a new collector's page; it returns the collector's latest page.
// size 0 keeps the page size; the library's own shrinking keeps the wrong part of the ring.
func fixCollector(ref types.ManagedObjectReference, size int) []types.BaseEvent {
	exMu.Lock() // no widened filter may be in place while the page is rebuilt
	defer exMu.Unlock()
	em := simulator.Map.EventManager()
	var page []types.BaseEvent
	simulator.Map.WithLock(em, func() {
		c, ok := eventCollectors(em)[ref]
		if !ok {
			return
		}
		rebuildPage(em, c, size)
		page = c.GetLatestPage()
	})
	return page
}

// widen lets the library's matching accept ev for every collector whose filter lists ev's
// eventTypeId; it returns the undo. The caller holds the EventManager's lock and exMu.
// exact also lifts the entity filter of those collectors (the library's "children" matching
// is broken); only safe when the lock is held until the undo, so no other event sees it.
func widen(em *simulator.EventManager, ev types.BaseEvent, exact bool) func() {
	type saved struct {
		c    *simulator.EventHistoryCollector
		spec types.EventFilterSpec
	}
	var undo []saved
	// PostEvent stamps the time only after this check; a zero time would fail every
	// collector's time filter, so stamp it now (PostEvent overwrites it moments later).
	if e := ev.GetEvent(); e.CreatedTime.IsZero() {
		e.CreatedTime = time.Now()
	}
	for _, c := range eventCollectors(em) {
		spec, ok := c.Filter.(types.EventFilterSpec)
		if !ok || classMatch(ev, spec.EventTypeId) || !newMatcher(spec).match(ev) {
			continue
		}
		wide := spec
		wide.EventTypeId = append(append([]string(nil), spec.EventTypeId...), "EventEx", "ExtendedEvent")
		wide.Time = nil
		if exact {
			wide.Entity = nil
		}
		c := c
		simulator.Map.WithLock(c, func() { c.Filter = wide })
		undo = append(undo, saved{c, spec})
	}
	return func() {
		for _, s := range undo {
			s := s
			simulator.Map.WithLock(s.c, func() { s.c.Filter = s.spec })
		}
	}
}

// postEventEx posts an EventEx / ExtendedEvent of ours so eventTypeId filters see it.
func postEventEx(ev types.BaseEvent, user string) {
	exMu.Lock()
	defer exMu.Unlock()
	em := simulator.Map.EventManager()
	ctx := internalCtx(user)
	simulator.Map.WithLock(em, func() {
		undo := widen(em, ev, true)
		em.PostEvent(ctx, &types.PostEvent{This: em.Self, EventToPost: ev})
		undo()
	})
}

// postEvent passes a client's PostEvent through; EventEx / ExtendedEvent get widened filters.
func (f *front) postEvent(c *soapCall, req *types.PostEvent) *httptest.ResponseRecorder {
	if req.EventToPost == nil || extendedTypeID(req.EventToPost) == "" {
		return f.pass(c, c.body)
	}
	exMu.Lock()
	defer exMu.Unlock()
	em := simulator.Map.EventManager()
	var undo func()
	simulator.Map.WithLock(em, func() { undo = widen(em, req.EventToPost, false) })
	rec := f.pass(c, c.body)
	simulator.Map.WithLock(em, undo)
	return rec
}

// queryEvents serves QueryEvents through a temporary collector with the corrected page.
func (f *front) queryEvents(c *soapCall, req *types.QueryEvents) *httptest.ResponseRecorder {
	filter := req.Filter
	if filter.MaxCount <= 0 || filter.MaxCount > maxHistory {
		filter.MaxCount = maxHistory
	}
	create, err := soapRequest(&methods.CreateCollectorForEventsBody{Req: &types.CreateCollectorForEvents{This: req.This, Filter: filter}})
	if err != nil {
		return f.pass(c, c.body)
	}
	rec := f.pass(c, create)
	if rec.Code != http.StatusOK {
		return rec // the library's fault (not authenticated, bad maxCount, ...)
	}
	m := collectorReturnval.FindSubmatch(rec.Body.Bytes())
	if m == nil {
		return f.pass(c, c.body)
	}
	ref := types.ManagedObjectReference{Type: "EventHistoryCollector", Value: string(m[1])}
	page := fixCollector(ref, 0)
	if destroy, derr := soapRequest(&methods.DestroyCollectorBody{Req: &types.DestroyCollector{This: ref}}); derr == nil {
		f.pass(c, destroy)
	}
	if req.Filter.MaxCount > 0 && int(req.Filter.MaxCount) < len(page) {
		page = page[:req.Filter.MaxCount]
	}
	return soapResponse(&methods.QueryEventsBody{Res: &types.QueryEventsResponse{Returnval: page}})
}

// The scrollable view of event collectors, as vCenter defines it: a new collector is
// positioned before its oldest event; ReadNextEvents returns events oldest to newest and
// moves forward; ReadPreviousEvents returns them newest to oldest and moves back;
// RewindCollector goes back before the oldest; ResetCollector goes to just before the latest
// page. The library keeps an index into the latest page instead (so a reader never gets past
// the page, and new events shift it); the position here is an event key: events with a
// larger key are ahead of the view.
var views = struct {
	sync.Mutex
	pos map[types.ManagedObjectReference]int32
}{pos: map[types.ManagedObjectReference]int32{}}

// collectorEvents returns a collector's matching history, oldest first, and its latest page.
func collectorEvents(ref types.ManagedObjectReference) (all []types.BaseEvent, latest []types.BaseEvent, ok bool) {
	exMu.Lock()
	defer exMu.Unlock()
	em := simulator.Map.EventManager()
	simulator.Map.WithLock(em, func() {
		c, found := eventCollectors(em)[ref]
		if !found {
			return
		}
		var spec types.EventFilterSpec
		simulator.Map.WithLock(c, func() {
			spec, found = c.Filter.(types.EventFilterSpec)
			latest = c.GetLatestPage()
		})
		if !found {
			return
		}
		ok = true
		m := newMatcher(spec)
		hist := eventHistory(em)
		for i := len(hist) - 1; i >= 0; i-- {
			if m.match(hist[i]) {
				all = append(all, hist[i])
			}
		}
	})
	return all, latest, ok
}

// scroll serves ReadNextEvents / ReadPreviousEvents / ResetCollector / RewindCollector on
// event collectors after the library has checked the session and the arguments.
func (f *front) scroll(c *soapCall, ref types.ManagedObjectReference) *httptest.ResponseRecorder {
	rec := f.pass(c, c.body)
	if rec.Code != http.StatusOK || ref.Type != "EventHistoryCollector" {
		return rec
	}
	all, latest, ok := collectorEvents(ref)
	if !ok {
		return rec
	}
	views.Lock()
	defer views.Unlock()
	pos := views.pos[ref]
	switch req := c.method.Body.(type) {
	case *types.RewindCollector:
		views.pos[ref] = 0
	case *types.ResetCollector:
		p := int32(0)
		for _, ev := range all {
			if k := ev.GetEvent().Key; k > p {
				p = k
			}
		}
		for _, ev := range latest {
			if k := ev.GetEvent().Key - 1; k < p {
				p = k
			}
		}
		views.pos[ref] = p
	case *types.ReadNextEvents:
		var out []types.BaseEvent
		for _, ev := range all {
			if len(out) == int(req.MaxCount) {
				break
			}
			if ev.GetEvent().Key > pos {
				out = append(out, ev)
			}
		}
		if len(out) > 0 {
			views.pos[ref] = out[len(out)-1].GetEvent().Key
		}
		return soapResponse(&methods.ReadNextEventsBody{Res: &types.ReadNextEventsResponse{Returnval: out}})
	case *types.ReadPreviousEvents:
		var out []types.BaseEvent
		for i := len(all) - 1; i >= 0 && len(out) < int(req.MaxCount); i-- {
			if all[i].GetEvent().Key <= pos {
				out = append(out, all[i])
			}
		}
		if len(out) > 0 {
			views.pos[ref] = out[len(out)-1].GetEvent().Key - 1
		}
		return soapResponse(&methods.ReadPreviousEventsBody{Res: &types.ReadPreviousEventsResponse{Returnval: out}})
	}
	return rec
}

// afterSetPageSize rebuilds the page the library refilled its own way.
func afterSetPageSize(req *types.SetCollectorPageSize) func([]byte) {
	return func([]byte) {
		size := int(req.MaxCount)
		if size == 0 {
			size = 10 // the library's default page size
		}
		if req.This.Type == "EventHistoryCollector" {
			fixCollector(req.This, size)
		}
	}
}

func afterDestroyCollector(req *types.DestroyCollector) func([]byte) {
	return func([]byte) {
		views.Lock()
		delete(views.pos, req.This)
		views.Unlock()
	}
}
