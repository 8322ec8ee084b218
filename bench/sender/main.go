// Command sender is bench.containers' container process: it sends UDP datagrams from
// its first instruction, so that a container's first packet leaves as soon as the
// runtime lets the process run (a Python start-up would give the attach tens of ms of
// head start the operator's workload may not give). Static, the standard library only,
// alone in a FROM-scratch image (bench/sender/build).
//
//	sender TAG GATEWAY PORT RATE PACKETS
//
// sends PACKETS datagrams holding TAG to GATEWAY:PORT at RATE per second, then prints
// one line, "SENT FIRST IFLINK": the sendto() calls that succeeded, the CLOCK_MONOTONIC
// time of the first one in seconds (the clock is system-wide: the bench and the
// controller read the same one) and its eth0's iflink (the ifindex of the host-side
// veth), and waits until its stdin is closed, so that the bench decides when the
// container goes.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

const (
	clockMonotonic = 1
	timerAbstime   = 1
)

// monotonic reads CLOCK_MONOTONIC in ns. Go's own monotonic reading is not exposed as
// an absolute value, and the figure is compared with other processes' clock_gettime.
func monotonic() int64 {
	var ts syscall.Timespec
	syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clockMonotonic,
		uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

// sleepUntil sleeps to an absolute CLOCK_MONOTONIC time: the pace does not drift with
// the time each send takes.
func sleepUntil(ns int64) {
	ts := syscall.NsecToTimespec(ns)
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_CLOCK_NANOSLEEP, clockMonotonic,
			timerAbstime, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		if errno != syscall.EINTR {
			return
		}
	}
}

func usage(why string) {
	fmt.Fprintf(os.Stderr, "sender: %s\nusage: sender TAG GATEWAY PORT RATE PACKETS\n", why)
	os.Exit(2)
}

func main() {
	if len(os.Args) != 6 {
		usage("five arguments expected")
	}
	tag := []byte(os.Args[1])
	ip := net.ParseIP(os.Args[2]).To4()
	port, errPort := strconv.Atoi(os.Args[3])
	rate, errRate := strconv.ParseFloat(os.Args[4], 64)
	packets, errPackets := strconv.Atoi(os.Args[5])
	if ip == nil || errPort != nil || errRate != nil || errPackets != nil || !(rate > 0) {
		usage("bad argument")
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	if err != nil {
		usage(err.Error())
	}
	dst := &syscall.SockaddrInet4{Port: port}
	copy(dst.Addr[:], ip)

	start := monotonic()
	sent, first := 0, int64(0)
	for k := 0; k < packets; k++ {
		sleepUntil(start + int64(float64(k)*1e9/rate))
		t := monotonic()
		if syscall.Sendto(fd, tag, 0, dst) == nil {
			if first == 0 {
				first = t
			}
			sent++
		}
	}
	iflink, _ := os.ReadFile("/sys/class/net/eth0/iflink")
	fmt.Printf("%d %d.%09d %s\n", sent, first/1e9, first%1e9, strings.TrimSpace(string(iflink)))
	io.Copy(io.Discard, os.Stdin)
}
