// Command vcsim is vsphere-av's bundled vSphere simulator: govmomi 0.24.2's simulator library
// (VPX model) plus what an agentless antivirus needs from a vCenter: guest operations
// (guest*.go), tools status that follows power state (tools.go), snapshot revert that
// restores guest files and power state (snapshots.go), clone/relocate placement
// (placement.go), eventTypeId event filters (events.go) and host management addresses
// (hosts.go). Behaviour changes go through a front handler on /sdk (front.go) because this
// version of the library has no per-method hook.
//
// Started by `vsphere-av vcsim` and by the Python test fixtures (vsphere_av/simulator.py);
// its first stdout line is the SDK URL, its second the SHA-256 thumbprint of its certificate.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // registers the /rest endpoints
)

// opts holds the guest settings shared with the guest operations (guest*.go).
var opts struct {
	GuestRoot     string
	GuestUser     string
	GuestPassword string
}

// listenIP is the simulator's address as clients reach it: hosts report it as their
// management address, clients put it in place of `*` in guest transfer URLs.
var listenIP = "127.0.0.1"

func main() {
	log.SetFlags(log.LstdFlags)
	log.SetPrefix("vcsim: ")
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "vcsim: error: %s\n", err)
		os.Exit(2)
	}
}

func run() error {
	listen := flag.String("listen", "127.0.0.1:0", "HOST:PORT to listen on (port 0: a free port)")
	datacenters := flag.Int("datacenters", 1, "number of datacenters")
	clusters := flag.Int("clusters", 1, "clusters per datacenter")
	hosts := flag.Int("hosts", 3, "hosts per cluster")
	vms := flag.Int("vms", 2, "VMs per cluster")
	username := flag.String("username", "user", "vCenter login user")
	password := flag.String("password", "pass", "vCenter login password")
	guestRoot := flag.String("guest-root", "", "directory holding one guest file tree per VM (default: a temporary directory)")
	guestUser := flag.String("guest-user", "root", "the guest account every VM accepts")
	guestPassword := flag.String("guest-password", "vmware", "password of the guest account")
	certFile := flag.String("cert", "", "write the server's PEM certificate to this file")
	identity := flag.String("identity", "", "PEM file with the TLS key and certificate: used when it exists, written (0600) with a fresh pair when not, so a restarted simulator presents the same certificate")
	verbose := flag.Bool("verbose", false, "keep the library's per-update property collector log lines")
	disks := flag.Bool("disks", false, "give every VM a real disk image built from its guest tree (disks.go)")
	mkdisk := flag.String("mkdisk", "", "the disk build script (default: vcsim/mkdisk.sh beside build/)")
	flag.DurationVar(&ticketDelay, "ticket-delay", 0, "delay each AcquireGenericServiceTicket answer by this long (a real vCenter's round trip, e.g. 20ms)")
	flag.Parse()
	if !*verbose {
		log.SetOutput(&quietLog{out: os.Stderr})
	}
	// Catch signals before anything is printed: a client may stop us as soon as it reads the URL.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)

	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(flag.Args(), " "))
	}
	for name, n := range map[string]int{"datacenters": *datacenters, "clusters": *clusters, "hosts": *hosts, "vms": *vms} {
		if n < 0 || n > 1000 {
			return fmt.Errorf("-%s must be between 0 and 1000, got %d", name, n)
		}
	}
	if *datacenters < 1 {
		return fmt.Errorf("-datacenters must be at least 1")
	}
	if *clusters > 0 && *hosts < 1 {
		return fmt.Errorf("-hosts must be at least 1 when there are clusters")
	}
	if ticketDelay < 0 || ticketDelay > time.Minute {
		return fmt.Errorf("-ticket-delay must be between 0 and 1m, got %s", ticketDelay)
	}
	if *username == "" || *password == "" {
		return fmt.Errorf("-username and -password must not be empty")
	}
	host, port, err := net.SplitHostPort(*listen)
	if err != nil {
		return fmt.Errorf("-listen %q: want HOST:PORT: %s", *listen, err)
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return fmt.Errorf("-listen %q: HOST must be an IP address", *listen)
	}
	if p, perr := strconv.Atoi(port); perr != nil || p < 0 || p > 65535 {
		return fmt.Errorf("-listen %q: bad port", *listen)
	}
	if !ip.IsUnspecified() {
		listenIP = ip.String()
	}
	// The library panics when it cannot listen: find out first, with a clear error.
	probe, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %s", *listen, err)
	}
	_ = probe.Close()

	if *disks {
		script, serr := findMkdisk(*mkdisk)
		if serr != nil {
			return serr
		}
		diskOpts.enabled, diskOpts.script = true, script
	}
	vcLogin.user, vcLogin.password = *username, *password
	opts.GuestUser = *guestUser
	opts.GuestPassword = *guestPassword
	if *guestRoot == "" {
		dir, terr := os.MkdirTemp("", "vcsim-guests-")
		if terr != nil {
			return terr
		}
		defer os.RemoveAll(dir)
		opts.GuestRoot = dir
	} else {
		if err = os.MkdirAll(*guestRoot, 0o755); err != nil {
			return fmt.Errorf("-guest-root: %s", err)
		}
		opts.GuestRoot = *guestRoot
	}

	cert, err := serverCert(ip, *identity)
	if err != nil {
		return err
	}
	if *certFile != "" {
		block := &pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}
		if err = os.WriteFile(*certFile, pem.EncodeToMemory(block), 0o644); err != nil {
			return fmt.Errorf("-cert: %s", err)
		}
	}

	model := simulator.VPX()
	model.Datacenter = *datacenters
	model.Cluster = *clusters
	model.ClusterHost = *hosts
	model.Host = 0 // no standalone hosts: every host belongs to a cluster
	model.Pool = 0 // only the cluster's root pool, so Machine is VMs per cluster
	model.Machine = *vms
	if err = model.Create(); err != nil {
		return fmt.Errorf("creating the inventory: %s", err)
	}
	// Not model.Remove(): it walks the registry without a lock while requests may still run
	// (a crash at exit). No VM has a container here, so removing the datastore directories
	// it created is all there is to clean up.
	var datastoreDirs []string
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok {
			datastoreDirs = append(datastoreDirs, ds.Info.GetDatastoreInfo().Url)
		}
	}
	defer func() {
		for _, dir := range datastoreDirs {
			if strings.HasPrefix(filepath.Base(dir), "govcsim-") {
				_ = os.RemoveAll(dir)
			}
		}
	}()

	svc := model.Service
	svc.RegisterEndpoints = true
	svc.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	svc.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}

	// No srv.Close() on the way out: it waits for every request, and a client blocked in
	// WaitForUpdatesEx would hold the shutdown forever. Exiting closes the sockets.
	srv := svc.NewServer()

	installGuest(svc, srv)
	installVapi(svc) // POST /api: JSON-RPC sessions and tagging (vapi.go)
	installCore(srv)
	if diskOpts.enabled {
		buildAllDisks() // before the URL is printed: clients find the disks ready
	}

	addr := srv.Listener.Addr().(*net.TCPAddr)
	sdk := url.URL{
		Scheme: "https",
		User:   url.UserPassword(*username, *password),
		Host:   net.JoinHostPort(listenIP, strconv.Itoa(addr.Port)),
		Path:   "/sdk",
	}
	sum := sha256.Sum256(cert.Certificate[0])
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintln(out, sdk.String())
	fmt.Fprintln(out, "thumbprint="+strings.Join(hexes, ":"))
	if err = out.Flush(); err != nil {
		return err
	}

	sig := <-signals
	log.Printf("%s: shutting down", sig)
	return nil
}

// serverCert is the certificate the simulator presents: a fresh one, or with -identity the
// pair kept in that file (created on first use). A restart that must look like the same
// vCenter (clients pin the thumbprint) passes the same file.
func serverCert(listen net.IP, identity string) (tls.Certificate, error) {
	if identity != "" {
		if _, err := os.Stat(identity); err == nil {
			cert, lerr := tls.LoadX509KeyPair(identity, identity)
			if lerr != nil {
				return tls.Certificate{}, fmt.Errorf("-identity %s: %s", identity, lerr)
			}
			return cert, nil
		}
	}
	cert, err := selfSignedCert(listen)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating the TLS certificate: %s", err)
	}
	if identity == "" {
		return cert, nil
	}
	key, ok := cert.PrivateKey.(*rsa.PrivateKey)
	if !ok {
		return tls.Certificate{}, fmt.Errorf("-identity: unexpected key type")
	}
	blocks := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	blocks = append(blocks, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})...)
	if err = os.WriteFile(identity, blocks, 0o600); err != nil {
		return tls.Certificate{}, fmt.Errorf("-identity: %s", err)
	}
	return cert, nil
}

// selfSignedCert makes a fresh RSA 2048 certificate for 127.0.0.1 (and the listen IP).
func selfSignedCert(listen net.IP) (tls.Certificate, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	ips := []net.IP{net.ParseIP("127.0.0.1")}
	if !listen.IsUnspecified() && !listen.Equal(ips[0]) {
		ips = append(ips, listen)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"vsphere-av vcsim"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           ips,
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// chatter matches the library's log lines for every property collector update and every
// WaitForUpdatesEx that timed out (normal for a waiting client), which would otherwise
// flood stderr while clients wait for updates.
var chatter = regexp.MustCompile(`: applying \d+ updates to \d+ filters$|^\S+ has \d+ changes$|: WaitForUpdates MaxWaitSeconds exceeded$|^nfc PUT \S+: transferred \d+ bytes$`)

// quietLog drops the library's per-update chatter from log output (one Write per line).
type quietLog struct {
	out io.Writer
}

func (q *quietLog) Write(p []byte) (int, error) {
	line := strings.TrimRight(string(p), "\n")
	if strings.HasPrefix(line, "vcsim: ") {
		// prefix "vcsim: " then the date and time (two fields) then the message
		fields := strings.SplitN(line, " ", 4)
		if len(fields) == 4 && chatter.MatchString(fields[3]) {
			return len(p), nil
		}
	}
	return q.out.Write(p)
}
