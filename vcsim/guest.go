// Guest operations for the bundled simulator: per-VM guest file trees under
// opts.GuestRoot, our own GuestFileManager and GuestProcessManager (replacing the
// library's Docker-only singletons), and the /guestFile transfer endpoint.
//
// Called by main.go (installGuest after model.Create and NewServer; vmRootDir and
// copyTree from clone and snapshot handling).
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/vmware/govmomi/simulator"
)

// installGuest registers the guest operation handlers on svc and replaces the
// library's GuestFileManager / GuestProcessManager singletons.
func installGuest(svc *simulator.Service, srv *simulator.Server) {
	_ = svc
	_ = srv
}

// vmRootDir returns the guest root directory of the named VM, creating it on demand.
func vmRootDir(vmName string) string {
	dir := filepath.Join(opts.GuestRoot, filepath.Base(filepath.Clean("/"+vmName)))
	_ = os.MkdirAll(dir, 0o755)
	return dir
}

// copyTree copies the directory tree src to dst (dst is replaced), preserving modes
// and modification times; symlinks are copied as links and never followed.
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
			return os.Symlink(link, target)
		case mode.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirTime{target, fi.ModTime(), mode.Perm()})
			return nil
		case mode.IsRegular():
			if err := copyFile(p, target, mode.Perm()); err != nil {
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

func copyFile(src, dst string, perm os.FileMode) error {
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
