// GuestFileManager for the simulator (called by the govmomi SOAP dispatcher through
// reflection; calls guest_fs.go for path mapping and guest_transfer.go for tickets).
//
// Every method first checks, in this order: VM powered on (InvalidPowerState), tools
// running (GuestOperationsUnavailable), NamePasswordAuthentication with the configured
// guest account (InvalidGuestLogin).
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	guestDefaultMaxResults = 50
	guestMaxMaxResults     = 10000 // entries per ListFilesInGuest page at most
)

// guestFileManager replaces the library's Docker-only GuestFileManager.
type guestFileManager struct {
	mo.GuestFileManager
}

// Lock and Unlock opt out of the registry's per-object lock: the manager has no
// mutable managed state, and serialising every guest call would stall transfers.
func (m *guestFileManager) Lock()   {}
func (m *guestFileManager) Unlock() {}

// guestPrepareOp runs the preconditions and parses the guest path.
func guestPrepareOp(vm types.ManagedObjectReference, auth types.BaseGuestAuthentication, p string) (*guestVM, *guestPathSpec, *soap.Fault) {
	g, f := guestPrepare(vm, auth)
	if f != nil {
		return nil, nil, f
	}
	gp, f := g.parseGuestPath(p)
	if f != nil {
		return nil, nil, f
	}
	return g, gp, nil
}

// guestPrepareExisting runs the preconditions, parses p and resolves it to an entry
// that exists (following a final symbolic link when follow is set).
func guestPrepareExisting(vm types.ManagedObjectReference, auth types.BaseGuestAuthentication, p string, follow bool) (*guestVM, *guestPathSpec, *guestResolution, *soap.Fault) {
	g, f := guestPrepare(vm, auth)
	if f != nil {
		return nil, nil, nil, f
	}
	gp, r, f := g.existingPath(p, follow)
	if f != nil {
		return nil, nil, nil, f
	}
	return g, gp, r, nil
}

// existingPath parses p and resolves it to an entry that exists.
func (g *guestVM) existingPath(p string, follow bool) (*guestPathSpec, *guestResolution, *soap.Fault) {
	gp, f := g.parseGuestPath(p)
	if f != nil {
		return nil, nil, f
	}
	r, f := g.existing(gp, follow)
	return gp, r, f
}

// existing resolves gp; an entry that does not exist is FileNotFound.
func (g *guestVM) existing(gp *guestPathSpec, follow bool) (*guestResolution, *soap.Fault) {
	r, err := g.resolve(gp.comps, follow)
	if err != nil {
		return nil, guestFSFault(gp.guest, err)
	}
	if !r.exists {
		return nil, faultGuestNotFound(gp.guest)
	}
	return r, nil
}

// The SOAP methods below only hand the request to the function that does the work
// and wrap its answer (see guestReply).

func (m *guestFileManager) ListFilesInGuest(ctx *simulator.Context, req *types.ListFilesInGuest) soap.HasFault {
	return guestReply(guestListFiles(req))
}

// guestListFiles lists one page of a directory, or the entry itself if it is none.
func guestListFiles(req *types.ListFilesInGuest) (*types.ListFilesInGuestResponse, *soap.Fault) {
	g, gp, f := guestPrepareOp(req.Vm, req.Auth, req.FilePath)
	if f != nil {
		return nil, f
	}
	if req.Index < 0 {
		return nil, faultGuestArgument("index", "index must not be negative")
	}
	max := int(req.MaxResults)
	if max < 0 {
		return nil, faultGuestArgument("maxResults", "maxResults must not be negative")
	}
	if max == 0 {
		max = guestDefaultMaxResults
	}
	if max > guestMaxMaxResults {
		max = guestMaxMaxResults
	}
	pattern := req.MatchPattern
	if pattern == "" {
		pattern = ".*"
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return nil, faultGuestArgument("matchPattern", fmt.Sprintf("invalid matchPattern %q: %v", pattern, err))
	}
	r, f := g.existing(gp, false)
	if f != nil {
		return nil, f
	}
	dir := ""
	switch {
	case r.info.IsDir():
		dir = r.host
	case r.info.Mode()&os.ModeSymlink != 0:
		// A link to a directory inside the tree is listed like the directory; any
		// other link (dangling, to a file, or leading outside) is the entry itself.
		if t, err := g.resolve(gp.comps, true); err == nil && t.exists && t.info.IsDir() {
			dir = t.host
		}
	}
	res := &types.ListFilesInGuestResponse{}
	if dir == "" {
		if req.Index == 0 {
			res.Returnval.Files = []types.GuestFileInfo{g.fileInfo(r.info.Name(), r.host, r.info)}
		}
		return res, nil
	}
	files, remaining, err := g.listDir(dir, re, int(req.Index), max)
	if err != nil {
		return nil, guestFSFault(gp.guest, err)
	}
	res.Returnval.Files = files
	res.Returnval.Remaining = int32(remaining)
	return res, nil
}

func (m *guestFileManager) InitiateFileTransferFromGuest(ctx *simulator.Context, req *types.InitiateFileTransferFromGuest) soap.HasFault {
	return guestReply(guestDownload(req))
}

// guestDownload hands out a ticket to read one regular file.
func guestDownload(req *types.InitiateFileTransferFromGuest) (*types.InitiateFileTransferFromGuestResponse, *soap.Fault) {
	g, gp, r, f := guestPrepareExisting(req.Vm, req.Auth, req.GuestFilePath, true)
	if f != nil {
		return nil, f
	}
	if !r.info.Mode().IsRegular() {
		return nil, faultGuestNotAFile(gp.guest)
	}
	url, f := newGuestTicket(g, gp, false, r.info.Size(), false, nil)
	if f != nil {
		return nil, f
	}
	return &types.InitiateFileTransferFromGuestResponse{
		Returnval: types.FileTransferInformation{
			Attributes: g.attributes(r.host, r.info),
			Size:       r.info.Size(),
			Url:        url,
		},
	}, nil
}

func (m *guestFileManager) InitiateFileTransferToGuest(ctx *simulator.Context, req *types.InitiateFileTransferToGuest) soap.HasFault {
	return guestReply(guestUpload(req))
}

// guestUpload hands out a ticket to write one regular file.
func guestUpload(req *types.InitiateFileTransferToGuest) (*types.InitiateFileTransferToGuestResponse, *soap.Fault) {
	g, gp, f := guestPrepareOp(req.Vm, req.Auth, req.GuestFilePath)
	if f != nil {
		return nil, f
	}
	if req.FileSize < 0 || req.FileSize > guestMaxUpload {
		return nil, faultGuestArgument("fileSize",
			fmt.Sprintf("fileSize must be between 0 and %d bytes", int64(guestMaxUpload)))
	}
	if f := g.checkUploadTarget(gp, req.Overwrite); f != nil {
		return nil, f
	}
	url, f := newGuestTicket(g, gp, true, req.FileSize, req.Overwrite, req.FileAttributes)
	if f != nil {
		return nil, f
	}
	return &types.InitiateFileTransferToGuestResponse{Returnval: url}, nil
}

// checkUploadTarget checks that a file may be written at gp.
func (g *guestVM) checkUploadTarget(gp *guestPathSpec, overwrite bool) *soap.Fault {
	r, err := g.resolve(gp.comps, true)
	if err != nil {
		return guestFSFault(gp.guest, err)
	}
	if r.exists {
		if !r.info.Mode().IsRegular() {
			return faultGuestNotAFile(gp.guest)
		}
		if !overwrite {
			return faultGuestExists(gp.guest)
		}
		return nil
	}
	if len(r.missing) > 1 {
		return faultGuestNotFound(gp.guest)
	}
	return nil
}

func (m *guestFileManager) MoveFileInGuest(ctx *simulator.Context, req *types.MoveFileInGuest) soap.HasFault {
	return guestDone[types.MoveFileInGuestResponse](guestMove(req.Vm, req.Auth, req.SrcFilePath, req.DstFilePath, req.Overwrite, false))
}

func (m *guestFileManager) MoveDirectoryInGuest(ctx *simulator.Context, req *types.MoveDirectoryInGuest) soap.HasFault {
	return guestDone[types.MoveDirectoryInGuestResponse](guestMove(req.Vm, req.Auth, req.SrcDirectoryPath, req.DstDirectoryPath, false, true))
}

// guestMove renames a file (dirs false) or a directory (dirs true) from srcPath to
// dstPath; a directory never replaces an existing entry.
func guestMove(vm types.ManagedObjectReference, auth types.BaseGuestAuthentication, srcPath, dstPath string, overwrite, dirs bool) *soap.Fault {
	g, src, f := guestPrepareOp(vm, auth, srcPath)
	if f != nil {
		return f
	}
	dst, f := g.parseGuestPath(dstPath)
	if f != nil {
		return f
	}
	rs, f := g.existing(src, false)
	if f != nil {
		return f
	}
	switch {
	case !dirs && rs.info.IsDir():
		return faultGuestNotAFile(src.guest)
	case dirs && !rs.info.IsDir():
		return faultGuestNotADirectory(src.guest)
	case dirs && g.isRoot(rs.host):
		return simulator.Fault("cannot move a root directory: "+src.guest, &types.GuestPermissionDenied{})
	}
	to, f := g.moveTarget(rs, dst, overwrite, dirs)
	if f != nil {
		return f
	}
	if _, inside := guestWithinRoot(rs.host, to); dirs && inside && to != rs.host {
		return faultGuestArgument("dstDirectoryPath", "cannot move a directory into itself: "+dst.guest)
	}
	if err := os.Rename(rs.host, to); err != nil {
		return guestFSFault(dst.guest, err)
	}
	return nil
}

// moveTarget works out the host path a move to dst writes, with vSphere's faults.
func (g *guestVM) moveTarget(src *guestResolution, dst *guestPathSpec, overwrite, dirs bool) (string, *soap.Fault) {
	rd, err := g.resolve(dst.comps, false)
	if err != nil {
		return "", guestFSFault(dst.guest, err)
	}
	if !rd.exists {
		if len(rd.missing) > 1 {
			return "", faultGuestNotFound(dst.guest)
		}
		return rd.target(), nil
	}
	if rd.host == src.host {
		// Same entry: on Windows a rename that only changes case.
		if g.windows && len(dst.comps) > 0 {
			return filepath.Join(filepath.Dir(rd.host), dst.comps[len(dst.comps)-1]), nil
		}
		return rd.host, nil
	}
	if dirs || !overwrite {
		return "", faultGuestExists(dst.guest)
	}
	if rd.info.IsDir() {
		return "", faultGuestNotAFile(dst.guest)
	}
	return rd.host, nil
}

func (m *guestFileManager) DeleteFileInGuest(ctx *simulator.Context, req *types.DeleteFileInGuest) soap.HasFault {
	return guestDone[types.DeleteFileInGuestResponse](guestDeleteFile(req))
}

// guestDeleteFile removes a file or a symbolic link (never its target).
func guestDeleteFile(req *types.DeleteFileInGuest) *soap.Fault {
	_, gp, r, f := guestPrepareExisting(req.Vm, req.Auth, req.FilePath, false)
	if f != nil {
		return f
	}
	if r.info.IsDir() {
		return faultGuestNotAFile(gp.guest)
	}
	if err := os.Remove(r.host); err != nil { // a symlink itself, never its target
		return guestFSFault(gp.guest, err)
	}
	return nil
}

func (m *guestFileManager) DeleteDirectoryInGuest(ctx *simulator.Context, req *types.DeleteDirectoryInGuest) soap.HasFault {
	return guestDone[types.DeleteDirectoryInGuestResponse](guestDeleteDirectory(req))
}

// guestDeleteDirectory removes an empty directory, or with Recursive a whole tree.
func guestDeleteDirectory(req *types.DeleteDirectoryInGuest) *soap.Fault {
	g, gp, r, f := guestPrepareExisting(req.Vm, req.Auth, req.DirectoryPath, false)
	if f != nil {
		return f
	}
	if !r.info.IsDir() {
		return faultGuestNotADirectory(gp.guest)
	}
	if g.isRoot(r.host) {
		return simulator.Fault("cannot delete a root directory: "+gp.guest, &types.GuestPermissionDenied{})
	}
	var err error
	if req.Recursive {
		err = os.RemoveAll(r.host) // does not follow symlinks
	} else {
		empty, eerr := guestDirEmpty(r.host)
		if eerr != nil {
			return guestFSFault(gp.guest, eerr)
		}
		if !empty {
			return simulator.Fault("directory not empty: "+gp.guest,
				&types.DirectoryNotEmpty{FileFault: types.FileFault{File: gp.guest}})
		}
		err = os.Remove(r.host)
	}
	if err != nil {
		return guestFSFault(gp.guest, err)
	}
	return nil
}

func guestDirEmpty(p string) (bool, error) {
	d, err := os.Open(p)
	if err != nil {
		return false, err
	}
	defer d.Close()
	names, err := d.Readdirnames(1)
	if err == io.EOF {
		return true, nil
	}
	return len(names) == 0, err
}

func (m *guestFileManager) MakeDirectoryInGuest(ctx *simulator.Context, req *types.MakeDirectoryInGuest) soap.HasFault {
	return guestDone[types.MakeDirectoryInGuestResponse](guestMakeDirectory(req))
}

// guestMakeDirectory creates a directory, and its missing parents when asked to.
func guestMakeDirectory(req *types.MakeDirectoryInGuest) *soap.Fault {
	g, gp, f := guestPrepareOp(req.Vm, req.Auth, req.DirectoryPath)
	if f != nil {
		return f
	}
	r, err := g.resolve(gp.comps, false)
	if err != nil {
		return guestFSFault(gp.guest, err)
	}
	if r.exists {
		return faultGuestExists(gp.guest)
	}
	if len(r.missing) > 1 && !req.CreateParentDirectories {
		return faultGuestNotFound(gp.guest)
	}
	if err := guestMkdirChain(r, 0o755); err != nil {
		return guestFSFault(gp.guest, err)
	}
	return nil
}

// guestMkdirChain creates the missing components of a resolution one by one.
func guestMkdirChain(r *guestResolution, perm os.FileMode) error {
	cur := r.host
	for _, c := range r.missing {
		cur = filepath.Join(cur, c)
		if err := os.Mkdir(cur, perm); err != nil {
			return err
		}
	}
	return nil
}

func (m *guestFileManager) CreateTemporaryFileInGuest(ctx *simulator.Context, req *types.CreateTemporaryFileInGuest) soap.HasFault {
	p, f := createGuestTemp(req.Vm, req.Auth, req.Prefix, req.Suffix, req.DirectoryPath, false)
	return guestReply(&types.CreateTemporaryFileInGuestResponse{Returnval: p}, f)
}

func (m *guestFileManager) CreateTemporaryDirectoryInGuest(ctx *simulator.Context, req *types.CreateTemporaryDirectoryInGuest) soap.HasFault {
	p, f := createGuestTemp(req.Vm, req.Auth, req.Prefix, req.Suffix, req.DirectoryPath, true)
	return guestReply(&types.CreateTemporaryDirectoryInGuestResponse{Returnval: p}, f)
}

// createGuestTemp makes a temporary file or directory and returns its guest path.
// The default directory (/tmp, C:\Windows\Temp) is created when missing.
func createGuestTemp(vm types.ManagedObjectReference, auth types.BaseGuestAuthentication, prefix, suffix, dir string, isDir bool) (string, *soap.Fault) {
	g, f := guestPrepare(vm, auth)
	if f != nil {
		return "", f
	}
	if strings.ContainsAny(prefix+suffix, "/\\\x00*") || len(prefix)+len(suffix) > 200 {
		return "", faultGuestArgument("prefix", "prefix and suffix must be short and contain no path separators or '*'")
	}
	sep := "/"
	def := dir == ""
	if def {
		dir = "/tmp"
		if g.windows {
			dir = `C:\Windows\Temp`
		}
	}
	if g.windows && !strings.Contains(dir, "/") {
		sep = `\`
	}
	gp, f := g.parseGuestPath(dir)
	if f != nil {
		return "", f
	}
	r, err := g.resolve(gp.comps, true)
	if err != nil {
		return "", guestFSFault(gp.guest, err)
	}
	if !r.exists {
		if !def {
			return "", faultGuestNotFound(gp.guest)
		}
		if err := guestMkdirChain(r, 0o755); err != nil {
			return "", guestFSFault(gp.guest, err)
		}
		r = &guestResolution{host: r.target(), exists: true}
		if fi, err := os.Lstat(r.host); err == nil {
			r.info = fi
		}
	}
	if r.info == nil || !r.info.IsDir() {
		return "", faultGuestNotADirectory(gp.guest)
	}
	var name string
	if isDir {
		p, err := os.MkdirTemp(r.host, guestHostName(prefix)+"*"+guestHostName(suffix))
		if err != nil {
			return "", guestFSFault(gp.guest, err)
		}
		name = filepath.Base(p)
	} else {
		tf, err := os.CreateTemp(r.host, guestHostName(prefix)+"*"+guestHostName(suffix))
		if err != nil {
			return "", guestFSFault(gp.guest, err)
		}
		name = filepath.Base(tf.Name())
		tf.Close()
	}
	return strings.TrimRight(dir, `/\`) + sep + guestWireName(name), nil
}

func (m *guestFileManager) ChangeFileAttributesInGuest(ctx *simulator.Context, req *types.ChangeFileAttributesInGuest) soap.HasFault {
	return guestDone[types.ChangeFileAttributesInGuestResponse](guestChangeAttributes(req))
}

// guestChangeAttributes applies new attributes to an entry (a final link followed).
func guestChangeAttributes(req *types.ChangeFileAttributesInGuest) *soap.Fault {
	_, gp, r, f := guestPrepareExisting(req.Vm, req.Auth, req.GuestFilePath, true)
	if f != nil {
		return f
	}
	if r.info.Mode()&os.ModeSymlink != 0 { // cannot happen after following; be sure
		return simulator.Fault("refusing to change attributes through a symbolic link: "+gp.guest,
			&types.GuestPermissionDenied{})
	}
	if err := applyGuestAttributes(r.host, r.info, req.FileAttributes, true); err != nil {
		return guestFSFault(gp.guest, err)
	}
	return nil
}

// applyGuestAttributes sets what the simulator can model of guest file attributes:
// POSIX permissions, owner and group (as far as the host allows) and times; for
// Windows readOnly (owner write bit); hidden and createTime are not modelled.
// With strictOwner a failed owner change is an error, otherwise it is ignored.
func applyGuestAttributes(host string, fi os.FileInfo, attrs types.BaseGuestFileAttributes, strictOwner bool) error {
	if attrs == nil {
		return nil
	}
	switch a := attrs.(type) {
	case *types.GuestPosixFileAttributes:
		if a.Permissions != 0 {
			if err := guestChmod(host, uint32(a.Permissions)); err != nil {
				return err
			}
		}
		if a.OwnerId != nil || a.GroupId != nil {
			uid, gid := -1, -1
			if a.OwnerId != nil {
				uid = int(*a.OwnerId)
			}
			if a.GroupId != nil {
				gid = int(*a.GroupId)
			}
			if err := os.Lchown(host, uid, gid); err != nil && strictOwner {
				return err
			}
		}
	case *types.GuestWindowsFileAttributes:
		if a.ReadOnly != nil {
			mode := guestStatOf(fi).mode
			if *a.ReadOnly {
				mode &^= 0o222
			} else {
				mode |= 0o200
			}
			if err := guestChmod(host, mode); err != nil {
				return err
			}
		}
	}
	base := attrs.GetGuestFileAttributes()
	if base.ModificationTime != nil || base.AccessTime != nil {
		mt, at := fi.ModTime(), guestStatOf(fi).atime
		if base.ModificationTime != nil {
			mt = *base.ModificationTime
		}
		if base.AccessTime != nil {
			at = *base.AccessTime
		}
		if err := os.Chtimes(host, at, mt); err != nil {
			return err
		}
	}
	return nil
}
