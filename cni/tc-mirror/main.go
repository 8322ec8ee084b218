// Command tc-mirror is a chained CNI plugin: the container runtime runs it after the
// network plugin (bridge, ptp, ...) has made the container's veth and before the
// container's first instruction, so the hooks it asks for are in place before the
// container can send anything. The link-event path of `mirror run` races the sender;
// this one cannot.
//
// ADD: reads the previous plugin's result, asks each running mirror controller of this
// network namespace (over its control socket, under the state directory) to attach to
// the host-side interfaces the result names, waits until one has them hooked, and
// passes the result on unchanged. A controller that is absent, slow or refusing costs a
// warning on stderr and a count in the state directory (the controller exports it as
// mirror_cni_unanswered_total), never the pod: the result is passed on all the same.
// DEL: asks the controllers to detach (the interface usually goes with the network
// plugin's own DEL right after). CHECK and VERSION: as the CNI spec asks.
//
// Static, the standard library only: the DaemonSet copies it into the node's CNI binary
// directory, where no Python can be assumed.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	defaultStateDir = "/run/tc-mirror"
	defaultTimeout  = 3.0 // seconds for all controllers together
	soNetnsCookie   = 71  // SO_NETNS_COOKIE, Linux 5.14+
	unansweredFile  = "cni-unanswered"
)

var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"}

// netConf is the part of the network configuration this plugin reads.
type netConf struct {
	CNIVersion     string          `json:"cniVersion"`
	Name           string          `json:"name"`
	PrevResult     json.RawMessage `json:"prevResult"`
	StateDir       string          `json:"stateDir"`
	TimeoutSeconds float64         `json:"timeoutSeconds"`
}

type cniInterface struct {
	Name    string `json:"name"`
	Sandbox string `json:"sandbox"`
}

// request is what a controller is sent after the word cni-add or cni-del.
type request struct {
	ContainerID string   `json:"container_id"`
	Netns       string   `json:"netns"`
	Names       []string `json:"names"`
}

// answer is what a controller sends back (mirror.controller's cni handlers).
type answer struct {
	Attached []string          `json:"attached"`
	Detached []string          `json:"detached"`
	Skipped  map[string]string `json:"skipped"`
	Error    string            `json:"error"`
}

func warn(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tc-mirror: "+format+"\n", args...)
}

// fail reports an error the CNI way (a JSON error on stdout, exit 1). Used only for what
// the configuration gets wrong, never for the mirror being absent.
func fail(version string, code int, msg string) {
	if version == "" {
		version = "1.0.0"
	}
	out, _ := json.Marshal(map[string]interface{}{"cniVersion": version, "code": code, "msg": msg})
	os.Stdout.Write(out)
	os.Exit(1)
}

// netnsID names this network namespace as mirror.ownership.netns_id does: its cookie,
// or before Linux 5.14 the inode of /proc/self/ns/net.
func netnsID() (string, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err == nil {
		defer syscall.Close(fd)
		var cookie uint64
		size := uint32(unsafe.Sizeof(cookie))
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd),
			syscall.SOL_SOCKET, soNetnsCookie, uintptr(unsafe.Pointer(&cookie)),
			uintptr(unsafe.Pointer(&size)), 0)
		if errno == 0 {
			return "cookie-" + strconv.FormatUint(cookie, 10), nil
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil {
		return "", err
	}
	return "inode-" + strconv.FormatUint(st.Ino, 10), nil
}

// controllerSockets lists the control sockets of this namespace's controllers.
func controllerSockets(dir string) []string {
	found, _ := filepath.Glob(filepath.Join(dir, "controller-*.sock"))
	sort.Strings(found)
	return found
}

// maxSunPath is what sun_path holds with its terminating NUL.
const maxSunPath = 107

// ask sends one request line and reads the JSON answer, within the deadline.
func ask(path, line string, deadline time.Time) (*answer, error) {
	where := path
	if len(path) > maxSunPath {
		// A deep state directory: through a descriptor of the socket's directory, which
		// the kernel resolves to the same place (as mirror.ctlsocket.address does).
		dirfd, err := syscall.Open(filepath.Dir(path), syscall.O_RDONLY|syscall.O_DIRECTORY|
			syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		defer syscall.Close(dirfd)
		where = fmt.Sprintf("/proc/self/fd/%d/%s", dirfd, filepath.Base(path))
	}
	conn, err := net.DialTimeout("unix", where, time.Until(deadline))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	if _, err := io.WriteString(conn, line+"\n"); err != nil {
		return nil, err
	}
	conn.(*net.UnixConn).CloseWrite()
	body, err := io.ReadAll(io.LimitReader(conn, 1<<20))
	if err != nil {
		return nil, err
	}
	var a answer
	if err := json.Unmarshal(body, &a); err != nil {
		return nil, fmt.Errorf("no answer (the controller closed the connection)")
	}
	return &a, nil
}

// countUnanswered adds one to the state directory's count of requests no controller
// answered; only where a controller has made the namespace's directory (the plugin
// never creates root-owned directories of its own).
func countUnanswered(dir string) {
	st, err := os.Lstat(dir)
	if err != nil || !st.IsDir() {
		return
	}
	path := filepath.Join(dir, unansweredFile)
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CREAT|syscall.O_NOFOLLOW|
		syscall.O_CLOEXEC, 0o600)
	if err != nil {
		warn("cannot count it in %s: %v", path, err)
		return
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if err := syscall.Flock(fd, syscall.LOCK_EX); err != nil {
		return
	}
	raw, _ := io.ReadAll(f)
	n, _ := strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64)
	f.Truncate(0)
	f.WriteAt([]byte(strconv.FormatUint(n+1, 10)+"\n"), 0)
}

// hostInterfaces are the interfaces of the previous result outside the container's
// namespace: the bridge and the veth's host end (the controller keeps those its --iface
// patterns select).
func hostInterfaces(prev json.RawMessage) []string {
	var r struct {
		Interfaces []cniInterface `json:"interfaces"`
	}
	json.Unmarshal(prev, &r)
	var names []string
	for _, i := range r.Interfaces {
		if i.Sandbox == "" && i.Name != "" {
			names = append(names, i.Name)
		}
	}
	return names
}

func main() {
	command := os.Getenv("CNI_COMMAND")
	if command == "VERSION" {
		out, _ := json.Marshal(map[string]interface{}{"cniVersion": "1.0.0",
			"supportedVersions": supportedVersions})
		os.Stdout.Write(out)
		return
	}
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("", 4, "reading the network configuration: "+err.Error())
	}
	var conf netConf
	if err := json.Unmarshal(raw, &conf); err != nil {
		fail("", 6, "the network configuration is not JSON: "+err.Error())
	}
	switch command {
	case "ADD", "DEL":
	case "CHECK":
		return
	default:
		fail(conf.CNIVersion, 4, fmt.Sprintf("CNI_COMMAND %q: ADD, DEL, CHECK or VERSION", command))
	}
	if command == "ADD" && len(conf.PrevResult) == 0 {
		fail(conf.CNIVersion, 7, "tc-mirror is a chained plugin: put it after the network "+
			"plugin in the configuration list (no prevResult)")
	}
	stateDir := conf.StateDir
	if stateDir == "" {
		stateDir = defaultStateDir
	}
	timeout := conf.TimeoutSeconds
	if !(timeout > 0 && timeout <= 60) {
		timeout = defaultTimeout
	}
	id, err := netnsID()
	dir := filepath.Join(stateDir, "netns-"+id)

	names := hostInterfaces(conf.PrevResult)
	if command == "ADD" {
		defer func() {
			// The result passes on unchanged whatever the mirror did: the pod starts.
			var prev map[string]interface{}
			if json.Unmarshal(conf.PrevResult, &prev) != nil {
				prev = map[string]interface{}{}
			}
			prev["cniVersion"] = conf.CNIVersion
			out, _ := json.Marshal(prev)
			os.Stdout.Write(out)
		}()
	}
	if err != nil {
		warn("cannot name this network namespace (%v): not mirrored", err)
		return
	}
	if len(names) == 0 {
		warn("the previous result names no host-side interface: nothing to attach")
		return
	}
	body, _ := json.Marshal(request{ContainerID: os.Getenv("CNI_CONTAINERID"),
		Netns: os.Getenv("CNI_NETNS"), Names: names})
	word := "cni-add"
	if command == "DEL" {
		word = "cni-del"
	}
	deadline := time.Now().Add(time.Duration(timeout * float64(time.Second)))
	sockets := controllerSockets(dir)
	if len(sockets) == 0 {
		if command == "ADD" {
			warn("no mirror controller runs in this network namespace (no control socket "+
				"under %s): %s not mirrored from its first packet", dir, strings.Join(names, ", "))
			countUnanswered(dir)
		}
		return
	}
	answered := false
	for _, path := range sockets {
		a, err := ask(path, word+" "+string(body), deadline)
		if err != nil {
			warn("controller %s did not answer: %v", filepath.Base(path), err)
			continue
		}
		if a.Error != "" {
			warn("controller %s: %s", filepath.Base(path), a.Error)
			continue
		}
		answered = true
		for _, name := range sortedKeys(a.Skipped) {
			if command == "ADD" {
				warn("%s: %s", name, a.Skipped[name])
			}
		}
	}
	if !answered && command == "ADD" {
		warn("no controller answered within %gs: %s not mirrored from its first packet "+
			"(the link-event path may still attach it)", timeout, strings.Join(names, ", "))
		countUnanswered(dir)
	}
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
