package main

// Which directory mkdisk.sh copies for each of a VM's disks (called by disks.go for every
// chain element it builds, from the live guest tree or a snapshot's recorded tree).
//
// Windows guests: disk n holds drive letter C, D, ... of the tree (<root>/C, <root>/D).
// Linux guests: disk n > 1 holds the subtree at its mount point (<root>/data); disk 1 holds
// the rest. When the VM has other disks, disk 1 is built from a staging copy of the tree
// made of hard links (same file system as the guest root, so no data is copied): their
// mount points are left empty and /etc/fstab gains one line per other disk
// ("/dev/sdb1 /data ext4 defaults 0 2", as an administrator adds it), so a reader mounts
// each disk where the guest does. The staging copy is removed after the build; the guest
// tree itself is never changed (its /etc/fstab is replaced in the copy, not written).

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// diskTree returns the directory to build disk lay.n from, given a guest tree root, and a
// func that removes anything made for it. others: the VM's other disks the simulator builds
// (their subtrees are left out of a Linux disk 1).
func diskTree(root string, lay diskLayout, others []diskLayout) (string, func(), error) {
	none := func() {}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", none, err
	}
	if lay.windows {
		if lay.mount == "" {
			return "", none, fmt.Errorf("disk %d: no drive letter left for it", lay.n)
		}
		dir := filepath.Join(root, guestLookupFold(root, lay.mount))
		return dir, none, os.MkdirAll(dir, 0o755)
	}
	if lay.n > 1 {
		dir := filepath.Join(root, filepath.FromSlash(strings.TrimPrefix(lay.mount, "/")))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", none, err
		}
		// the mount point must not lead out of the guest tree through a symlink
		realRoot, rerr := filepath.EvalSymlinks(root)
		realDir, derr := filepath.EvalSymlinks(dir)
		if rerr != nil || derr != nil || !strings.HasPrefix(realDir+"/", realRoot+"/") {
			return "", none, fmt.Errorf("disk %d: mount point %s is not a directory of the guest tree", lay.n, lay.mount)
		}
		return dir, none, nil
	}
	if len(others) == 0 {
		return root, none, nil
	}
	stage, err := os.MkdirTemp(filepath.Dir(root), ".vcsim-stage-")
	if err != nil {
		return "", none, err
	}
	done := func() { _ = os.RemoveAll(stage) }
	if err := stageRoot(root, stage, others); err != nil {
		done()
		return "", none, fmt.Errorf("staging the tree of disk 1: %s", err)
	}
	return stage, done, nil
}

// dirMeta is a directory's metadata, set on its staged copy once the copy is complete.
type dirMeta struct {
	path         string
	mode         uint32
	uid, gid     int
	atime, mtime time.Time
}

// stageRoot fills stage with the tree at root but the other disks' mount points (left as
// empty directories) and an /etc/fstab that mounts them.
func stageRoot(root, stage string, others []diskLayout) error {
	exclude := map[string]bool{}
	var lines []string
	sorted := append([]diskLayout{}, others...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].n < sorted[j].n })
	for _, o := range sorted {
		rel := strings.TrimPrefix(o.mount, "/")
		exclude[rel] = true
		if !o.luks { // an encrypted disk would need /etc/crypttab and its key: not mounted
			dev := fmt.Sprintf("/dev/sd%c", rune('a'+o.n-1))
			if o.table != "none" {
				dev += "1"
			}
			lines = append(lines, fmt.Sprintf("%s %s %s defaults 0 2", dev, o.mount, o.fs))
		}
	}
	var dirs []dirMeta
	err := filepath.Walk(root, func(p string, info os.FileInfo, werr error) error {
		if werr != nil {
			return werr
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel != "." && exclude[filepath.ToSlash(rel)] {
			if info.IsDir() {
				dirs = append(dirs, metaOf(filepath.Join(stage, rel), info))
				if err := os.MkdirAll(filepath.Join(stage, rel), 0o755); err != nil {
					return err
				}
				return filepath.SkipDir
			}
			return nil // a file where a disk is mounted: hidden by the mount
		}
		target := filepath.Join(stage, rel)
		if info.IsDir() {
			if rel != "." {
				if err := os.Mkdir(target, 0o755); err != nil {
					return err
				}
			}
			dirs = append(dirs, metaOf(target, info))
			return nil
		}
		// a hard link (of the symlink itself for a symlink: link(2) does not follow it)
		if err := os.Link(p, target); err == nil {
			return nil
		}
		return copyEntry(p, target, info)
	})
	if err != nil {
		return err
	}
	for rel := range exclude { // mount points the tree does not have yet
		if err := os.MkdirAll(filepath.Join(stage, filepath.FromSlash(rel)), 0o755); err != nil {
			return err
		}
	}
	if err := addFstabLines(stage, lines); err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		_ = os.Lchown(d.path, d.uid, d.gid)
		_ = guestChmod(d.path, d.mode)
		_ = os.Chtimes(d.path, d.atime, d.mtime)
	}
	return nil
}

// copyEntry copies a file or symlink where a hard link cannot be made (another file system).
func copyEntry(src, dst string, info os.FileInfo) error {
	st := guestStatOf(info)
	switch {
	case info.Mode()&os.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err == nil {
			err = os.Symlink(target, dst)
		}
		if err == nil {
			_ = os.Lchown(dst, int(st.uid), int(st.gid))
		}
		return err
	case info.Mode().IsRegular():
		data, err := os.ReadFile(src)
		if err == nil {
			err = os.WriteFile(dst, data, 0o600)
		}
		if err == nil {
			_ = os.Lchown(dst, int(st.uid), int(st.gid))
			_ = guestChmod(dst, st.mode)
			_ = os.Chtimes(dst, st.atime, info.ModTime())
		}
		return err
	}
	return nil // devices, FIFOs, sockets: left out when they cannot be linked
}

func metaOf(target string, info os.FileInfo) dirMeta {
	st := guestStatOf(info)
	return dirMeta{path: target, mode: st.mode, uid: int(st.uid), gid: int(st.gid),
		atime: st.atime, mtime: info.ModTime()}
}

// addFstabLines appends lines to the staged /etc/fstab (a new file: the staged one is a
// hard link to the guest's), or writes one when the guest has none. A symlinked /etc or
// fstab is left alone (writing through it could reach the guest tree).
func addFstabLines(stage string, lines []string) error {
	if len(lines) == 0 {
		return nil
	}
	etc := filepath.Join(stage, "etc")
	if st, err := os.Lstat(etc); err == nil && !st.IsDir() {
		return nil
	} else if err != nil {
		if err := os.Mkdir(etc, 0o755); err != nil {
			return err
		}
	}
	fstab := filepath.Join(etc, "fstab")
	var text []byte
	mode := os.FileMode(0o644)
	uid, gid := 0, 0
	if st, err := os.Lstat(fstab); err == nil {
		if !st.Mode().IsRegular() {
			return nil
		}
		if text, err = os.ReadFile(fstab); err != nil {
			return err
		}
		hs := guestStatOf(st)
		mode, uid, gid = st.Mode().Perm(), int(hs.uid), int(hs.gid)
		if err := os.Remove(fstab); err != nil { // the link, not the guest's file
			return err
		}
	}
	if len(text) > 0 && text[len(text)-1] != '\n' {
		text = append(text, '\n')
	}
	text = append(text, []byte(strings.Join(lines, "\n")+"\n")...)
	if err := os.WriteFile(fstab, text, mode); err != nil {
		return err
	}
	_ = os.Lchown(fstab, uid, gid)
	_ = guestChmod(fstab, uint32(mode))
	return nil
}
