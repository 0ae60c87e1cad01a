// Guest path mapping for the simulator's guest file systems (called by the guest file,
// transfer and process code in this package; touches only the host file system).
//
// Linux-style guests: "/a/b" is <VM root>/a/b. Windows guests: "C:\a\b" or "C:/a/b" is
// <VM root>/C/a/b, every existing component looked up case-insensitively, new ones
// created with the case given. ".." is resolved lexically and clamped at the guest root
// (as "/.." is "/" in a real guest). Symlinks are followed only while their target stays
// inside the VM root (relative targets from the link's directory, absolute targets as
// host paths); one that leads outside is never followed: listings show it as a symlink
// and reading or writing through it fails with GuestPermissionDenied.
//
// Names on the wire: a guest file name is a byte string, SOAP carries XML 1.0 text, which
// has no way to say ESC, BEL (most C0 controls) or bytes that are not UTF-8 (the encoder
// would turn each into U+FFFD and the file could never be named again). Every such byte b
// travels as the private-use character U+F700+b, and so does each byte of a name's own
// U+F700..U+F7FF characters, so the mapping is reversible for every name: guestWireName
// on the way out (listings), guestHostName on the way in (every path a client sends).
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	guestMaxSymlinkHops = 40
	guestMaxDirEntries  = 1000000 // names read from one directory at most
	guestMaxPathLen     = 4096
)

var (
	errGuestNotDir = errors.New("a path component is not a directory")
	errGuestLoop   = errors.New("too many levels of symbolic links")
)

// guestEscapeError reports a symlink whose target lies outside the VM root.
type guestEscapeError struct{ link string }

func (e *guestEscapeError) Error() string {
	return fmt.Sprintf("symbolic link %q points outside the guest file system", e.link)
}

// guestPathSpec is a parsed guest path: its components below the VM root.
type guestPathSpec struct {
	guest string   // as the client gave it, for messages and returned paths
	comps []string // for Windows the first one is the drive letter
}

// parseGuestPath validates a guest path and splits it into components.
func (g *guestVM) parseGuestPath(p string) (*guestPathSpec, *soap.Fault) {
	bad := func(why string) *soap.Fault {
		return simulator.Fault(fmt.Sprintf("invalid guest path %q: %s", p, why),
			&types.InvalidArgument{InvalidProperty: "path"})
	}
	if p == "" {
		return nil, bad("empty")
	}
	if len(p) > guestMaxPathLen {
		return nil, bad("too long")
	}
	if strings.IndexByte(p, 0) >= 0 {
		return nil, bad("contains NUL")
	}
	gp := &guestPathSpec{guest: p}
	rest := p
	if g.windows {
		rest = strings.ReplaceAll(p, `\`, "/")
		if len(rest) < 2 || rest[1] != ':' || !guestIsLetter(rest[0]) {
			return nil, bad(`expected a drive letter path such as C:\dir\file`)
		}
		drive := strings.ToUpper(rest[:1])
		rest = rest[2:]
		if rest != "" && rest[0] != '/' {
			return nil, bad("drive-relative paths are not supported")
		}
		gp.comps = append(gp.comps, drive)
	} else if rest[0] != '/' {
		return nil, bad("must be absolute")
	}
	for _, c := range strings.Split(path.Clean("/"+rest), "/") {
		if c == "" {
			continue
		}
		if g.windows && strings.ContainsAny(c, `:*?"<>|`) {
			return nil, bad(`contains one of :*?"<>|`)
		}
		gp.comps = append(gp.comps, guestHostName(c))
	}
	return gp, nil
}

// guestWireBase is where the private-use characters that stand for single bytes begin.
const guestWireBase = 0xF700

// guestWireByte reports whether byte b of a name cannot travel in XML 1.0 as it is: C0
// controls other than TAB and LF. CR could go as a character reference, but a client that
// writes it back literally (pyVmomi does) has it turned into LF by the XML parser.
func guestWireByte(b byte) bool { return b < 0x20 && b != '\t' && b != '\n' }

// guestWireName is a host file name as listings send it (see the file comment).
func guestWireName(name string) string {
	var out strings.Builder
	for i := 0; i < len(name); {
		r, size := utf8.DecodeRuneInString(name[i:])
		bad := (r == utf8.RuneError && size == 1) || r == 0xFFFE || r == 0xFFFF ||
			(r >= guestWireBase && r <= guestWireBase+0xFF) || (size == 1 && guestWireByte(name[i]))
		if !bad {
			out.WriteString(name[i : i+size])
		} else {
			for j := 0; j < size; j++ {
				out.WriteRune(rune(guestWireBase + int(name[i+j])))
			}
		}
		i += size
	}
	return out.String()
}

// guestHostName is the host file name a client means by a name in wire form.
func guestHostName(name string) string {
	if strings.IndexFunc(name, func(r rune) bool { return r >= guestWireBase && r <= guestWireBase+0xFF }) < 0 {
		return name
	}
	var out []byte
	for _, r := range name {
		if r >= guestWireBase && r <= guestWireBase+0xFF {
			out = append(out, byte(r-guestWireBase))
		} else {
			out = utf8.AppendRune(out, r)
		}
	}
	return string(out)
}

func guestIsLetter(b byte) bool { return (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') }

// guestResolution is where a guest path lands on the host.
type guestResolution struct {
	host    string      // host path of the entry, or of its deepest existing directory
	exists  bool        // the full path exists (info is its Lstat)
	info    os.FileInfo // valid when exists
	missing []string    // components below host that do not exist yet (when !exists)
}

// target is the host path the guest path names (existing or not).
func (r *guestResolution) target() string {
	if r.exists {
		return r.host
	}
	return filepath.Join(append([]string{r.host}, r.missing...)...)
}

// resolve maps components to the host, following in-tree symlinks on every
// intermediate component and on the last one when followLast is set.
func (g *guestVM) resolve(comps []string, followLast bool) (*guestResolution, error) {
	queue := append([]string(nil), comps...)
	cur := g.root
	hops := 0
	var info os.FileInfo
	for len(queue) > 0 {
		c := queue[0]
		queue = queue[1:]
		name := c
		if g.windows {
			name = guestLookupFold(cur, c)
		}
		next := filepath.Join(cur, name)
		fi, err := os.Lstat(next)
		if err != nil {
			if os.IsNotExist(err) {
				return &guestResolution{host: cur, missing: append([]string{name}, queue...)}, nil
			}
			if errors.Is(err, syscall.ENOTDIR) {
				return nil, errGuestNotDir
			}
			return nil, err
		}
		if fi.Mode()&os.ModeSymlink != 0 && (len(queue) > 0 || followLast) {
			hops++
			if hops > guestMaxSymlinkHops {
				return nil, errGuestLoop
			}
			link, err := os.Readlink(next)
			if err != nil {
				return nil, err
			}
			abs := link
			if !filepath.IsAbs(link) {
				abs = filepath.Join(cur, link)
			}
			rel, ok := guestWithinRoot(g.root, filepath.Clean(abs))
			if !ok {
				return nil, &guestEscapeError{link: c}
			}
			var tc []string
			if rel != "" {
				tc = strings.Split(rel, string(filepath.Separator))
			}
			queue = append(tc, queue...)
			cur = g.root
			info = nil
			continue
		}
		if len(queue) > 0 && !fi.IsDir() {
			return nil, errGuestNotDir
		}
		cur = next
		info = fi
	}
	if info == nil { // the root itself, or a link to it
		fi, err := os.Lstat(cur)
		if err != nil {
			return nil, err
		}
		info = fi
	}
	return &guestResolution{host: cur, exists: true, info: info}, nil
}

// guestWithinRoot returns p relative to root when p is root or below it.
func guestWithinRoot(root, p string) (string, bool) {
	if p == root {
		return "", true
	}
	if strings.HasPrefix(p, root+string(filepath.Separator)) {
		return p[len(root)+1:], true
	}
	return "", false
}

// guestLookupFold finds name in dir case-insensitively (exact match preferred).
func guestLookupFold(dir, name string) string {
	if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
		return name
	}
	f, err := os.Open(dir)
	if err != nil {
		return name
	}
	defer f.Close()
	best := ""
	seen := 0
	for seen < guestMaxDirEntries {
		names, err := f.Readdirnames(1024)
		for _, n := range names {
			if strings.EqualFold(n, name) && (best == "" || n < best) {
				best = n
			}
		}
		seen += len(names)
		if err != nil || len(names) == 0 {
			break
		}
	}
	if best == "" {
		return name
	}
	return best
}

// isRoot reports whether a resolved host path is the VM root or a Windows drive root.
func (g *guestVM) isRoot(host string) bool {
	rel, ok := guestWithinRoot(g.root, host)
	if !ok || rel == "" {
		return true
	}
	return g.windows && !strings.Contains(rel, string(filepath.Separator))
}

// guestFSFault turns a file system error into a vSphere fault naming the guest path.
func guestFSFault(guestPath string, err error) *soap.Fault {
	var esc *guestEscapeError
	switch {
	case errors.As(err, &esc):
		return simulator.Fault(fmt.Sprintf("%s: %s", guestPath, esc.Error()), &types.GuestPermissionDenied{})
	case errors.Is(err, errGuestLoop):
		return simulator.Fault(fmt.Sprintf("%s: %s", guestPath, err), &types.GuestPermissionDenied{})
	case errors.Is(err, errGuestNotDir):
		return simulator.Fault(fmt.Sprintf("file not found: %s (%s)", guestPath, err),
			&types.FileNotFound{FileFault: types.FileFault{File: guestPath}})
	case os.IsNotExist(err):
		return faultGuestNotFound(guestPath)
	case os.IsPermission(err):
		return simulator.Fault(fmt.Sprintf("permission denied: %s", guestPath), &types.GuestPermissionDenied{})
	case os.IsExist(err):
		return faultGuestExists(guestPath)
	}
	msg := err.Error()
	var pe *os.PathError
	if errors.As(err, &pe) {
		msg = pe.Err.Error() // never show host paths
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		msg = le.Err.Error()
	}
	return simulator.Fault(fmt.Sprintf("guest operation on %s failed: %s", guestPath, msg), &types.GuestOperationsFault{})
}

func faultGuestNotFound(p string) *soap.Fault {
	return simulator.Fault("file not found: "+p, &types.FileNotFound{FileFault: types.FileFault{File: p}})
}

func faultGuestExists(p string) *soap.Fault {
	return simulator.Fault("file already exists: "+p, &types.FileAlreadyExists{FileFault: types.FileFault{File: p}})
}

func faultGuestNotAFile(p string) *soap.Fault {
	return simulator.Fault("not a file: "+p, &types.NotAFile{FileFault: types.FileFault{File: p}})
}

func faultGuestNotADirectory(p string) *soap.Fault {
	return simulator.Fault("not a directory: "+p, &types.NotADirectory{FileFault: types.FileFault{File: p}})
}

func faultGuestArgument(prop, msg string) *soap.Fault {
	return simulator.Fault(msg, &types.InvalidArgument{InvalidProperty: prop})
}

// guestFileType is the GuestFileType of an Lstat result.
func guestFileType(fi os.FileInfo) string {
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return string(types.GuestFileTypeSymlink)
	case fi.IsDir():
		return string(types.GuestFileTypeDirectory)
	}
	return string(types.GuestFileTypeFile)
}

func guestTime(t time.Time) *time.Time {
	t = t.UTC().Truncate(time.Microsecond)
	return &t
}

// attributes builds POSIX or Windows attributes for one Lstat result.
func (g *guestVM) attributes(host string, fi os.FileInfo) types.BaseGuestFileAttributes {
	st := guestStatOf(fi)
	base := types.GuestFileAttributes{
		ModificationTime: guestTime(fi.ModTime()),
		AccessTime:       guestTime(st.atime),
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		if link, err := os.Readlink(host); err == nil {
			base.SymlinkTarget = guestWireName(link)
		}
	}
	if g.windows {
		// Windows model: hidden = name starts with "."; readOnly = owner write bit
		// clear; createTime = the host's status change time.
		hidden := strings.HasPrefix(fi.Name(), ".")
		ro := st.mode&0o200 == 0
		return &types.GuestWindowsFileAttributes{
			GuestFileAttributes: base,
			Hidden:              &hidden,
			ReadOnly:            &ro,
			CreateTime:          guestTime(st.ctime),
		}
	}
	uid, gid := st.uid, st.gid
	return &types.GuestPosixFileAttributes{
		GuestFileAttributes: base,
		OwnerId:             &uid,
		GroupId:             &gid,
		Permissions:         int64(st.mode),
	}
}

func (g *guestVM) fileInfo(name, host string, fi os.FileInfo) types.GuestFileInfo {
	return types.GuestFileInfo{
		Path:       guestWireName(name),
		Type:       guestFileType(fi),
		Size:       fi.Size(),
		Attributes: g.attributes(host, fi),
	}
}

// listDir returns one page of a directory's entries whose names match re, sorted by
// name, and how many matches follow the page.
func (g *guestVM) listDir(dir string, re *regexp.Regexp, index, max int) ([]types.GuestFileInfo, int, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, 0, err
	}
	var names []string
	seen := 0
	for {
		batch, rerr := f.Readdirnames(1024)
		for _, n := range batch {
			if re.MatchString(guestWireName(n)) {
				names = append(names, n)
			}
		}
		seen += len(batch)
		if rerr == io.EOF || len(batch) == 0 {
			break
		}
		if rerr != nil {
			f.Close()
			return nil, 0, rerr
		}
		if seen > guestMaxDirEntries {
			f.Close()
			return nil, 0, fmt.Errorf("directory has more than %d entries", guestMaxDirEntries)
		}
	}
	f.Close()
	sort.Strings(names)
	if index > len(names) {
		index = len(names)
	}
	end := index + max
	if end > len(names) {
		end = len(names)
	}
	var out []types.GuestFileInfo
	for _, n := range names[index:end] {
		p := filepath.Join(dir, n)
		fi, err := os.Lstat(p)
		if err != nil {
			continue // vanished meanwhile
		}
		out = append(out, g.fileInfo(n, p, fi))
	}
	return out, len(names) - end, nil
}
