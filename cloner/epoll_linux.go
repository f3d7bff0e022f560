//go:build linux

package cloner

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// epoller watches the tun fds that have pollers for new packets, with one
// edge-triggered epoll set and one goroutine for the whole backend: no
// goroutine or thread per waiter, and nothing at all on the packet path of
// a device nobody polls. Edge-triggered, a tun fd reports every wakeup the
// kernel makes for a new packet, and each becomes one FUSE_NOTIFY_POLL, so
// a client's edge-triggered epoll fires for every new packet.
type epoller struct {
	start sync.Once
	err   error
	epfd  int
	stop  int // eventfd: written to end the loop
	done  chan struct{}

	mu    sync.Mutex // guards wakes
	wakes map[int32]func()
}

func (e *epoller) init() error {
	e.start.Do(func() {
		e.epfd, e.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if e.err != nil {
			return
		}
		e.stop, e.err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if e.err != nil {
			unix.Close(e.epfd)
			return
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(e.stop)}
		if e.err = unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, e.stop, &ev); e.err != nil {
			return
		}
		e.wakes = make(map[int32]func())
		e.done = make(chan struct{})
		go e.loop()
	})
	return e.err
}

func (e *epoller) loop() {
	defer close(e.done)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(e.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		for _, ev := range events[:n] {
			if ev.Fd == int32(e.stop) {
				return
			}
			e.mu.Lock()
			w := e.wakes[ev.Fd]
			e.mu.Unlock()
			if w != nil {
				w()
			}
		}
	}
}

// add watches fd; wake runs on the loop goroutine for each new event.
func (e *epoller) add(fd int, wake func()) error {
	if err := e.init(); err != nil {
		return fmt.Errorf("cloner: epoll: %w", err)
	}
	e.mu.Lock()
	e.wakes[int32(fd)] = wake
	e.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET | unix.EPOLLERR | unix.EPOLLHUP, Fd: int32(fd)}
	return unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, fd, &ev)
}

// del stops watching fd; call it before fd is closed.
func (e *epoller) del(fd int) {
	_ = unix.EpollCtl(e.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	e.mu.Lock()
	delete(e.wakes, int32(fd))
	e.mu.Unlock()
}

// close ends the loop and releases the epoll fds.
func (e *epoller) close() {
	if e.done == nil {
		return
	}
	var one = [8]byte{1}
	_, _ = unix.Write(e.stop, one[:])
	<-e.done
	unix.Close(e.stop)
	unix.Close(e.epfd)
}
