// Host stat details for guest file attributes (called by guest_fs.go). Linux only,
// like the rest of the simulator's supported platforms (Debian 12/13).
package main

import (
	"os"
	"syscall"
	"time"
)

// guestHostStat is what a guest file listing reports beyond os.FileInfo.
type guestHostStat struct {
	atime, ctime time.Time
	uid, gid     int32
	mode         uint32 // permission bits including setuid/setgid/sticky
}

func guestStatOf(fi os.FileInfo) guestHostStat {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return guestHostStat{atime: fi.ModTime(), ctime: fi.ModTime(), mode: uint32(fi.Mode().Perm())}
	}
	return guestHostStat{
		atime: time.Unix(st.Atim.Unix()),
		ctime: time.Unix(st.Ctim.Unix()),
		uid:   int32(st.Uid),
		gid:   int32(st.Gid),
		mode:  st.Mode & 0o7777,
	}
}

// guestChmod sets permission bits given as a POSIX mode (07777 range).
func guestChmod(p string, mode uint32) error {
	return syscall.Chmod(p, mode&0o7777)
}

// guestOpenNoFollow opens an existing file for reading without following a final symlink.
func guestOpenNoFollow(p string) (*os.File, error) {
	return os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
}
