//go:build linux

package cloner

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fsnotify/fsnotify"
)

// WatchNetnsGone calls gone once when the namespace file path is removed
// (`ip netns del NAME` unmounts and unlinks /run/netns/NAME), until done
// is closed. It watches the directory with inotify, as `ip netns monitor`
// does. The daemon holds the namespace alive while it has a socket or a
// tun fd in it, so the kernel destroys the namespace and its interfaces
// only once gone has made the daemon let go (Cloner.Retire, Linux.Close).
// A namespace named by a /proc path is not followed: it lives as long as
// its process or the daemon, and such paths send no inotify events.
func WatchNetnsGone(path string, done <-chan struct{}, gone func(), onError func(error)) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("cloner: watch %s: %w", path, err)
	}
	path = filepath.Clean(path)
	if err := w.Add(filepath.Dir(path)); err != nil {
		w.Close()
		return fmt.Errorf("cloner: watch %s: %w", filepath.Dir(path), err)
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		w.Close()
		go gone() // deleted before the watch began
		return nil
	}
	go func() {
		defer w.Close()
		for {
			select {
			case <-done:
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				if filepath.Clean(ev.Name) == path && ev.Has(fsnotify.Remove) {
					gone()
					return
				}
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				onError(err)
			}
		}
	}()
	return nil
}
