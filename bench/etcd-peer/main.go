// etcd-peer measures etcd's own distributed lock, clientv3/concurrency.Mutex
// (a key per waiter under a prefix, FIFO by creation revision, each waiter
// watching the key just ahead of it), on the same etcd the API server uses:
//
//   - cycle: Lock + Unlock by one uncontended session, back to back;
//   - handoff: 1 holder and -waiters waiters (own sessions); the time from the
//     holder's Unlock returning to the next waiter's Lock returning.
//
// Usage: etcd-peer -endpoints http://127.0.0.1:23790 -cycles 200 -handoffs 50 -waiters 10
// Prints one JSON object: {"cycle_ms": [...], "handoff_ms": [...]}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

type result struct {
	CycleMs   []float64 `json:"cycle_ms"`
	HandoffMs []float64 `json:"handoff_ms"`
	Waiters   int       `json:"waiters"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "etcd-peer:", err)
	os.Exit(2)
}

func main() {
	endpoints := flag.String("endpoints", "http://127.0.0.1:23790", "comma-separated etcd endpoints")
	cycles := flag.Int("cycles", 200, "uncontended Lock+Unlock cycles to measure")
	handoffs := flag.Int("handoffs", 50, "handoffs to measure")
	waiters := flag.Int("waiters", 10, "waiters besides the holder")
	hold := flag.Duration("hold", 50*time.Millisecond, "how long each holder works before unlocking")
	flag.Parse()

	client, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second})
	if err != nil {
		fail(err)
	}
	defer client.Close()
	ctx := context.Background()
	prefix := fmt.Sprintf("/etcd-peer/%d/", time.Now().UnixNano())
	out := result{Waiters: *waiters}

	// 1. uncontended cycles
	session, err := concurrency.NewSession(client, concurrency.WithTTL(30))
	if err != nil {
		fail(err)
	}
	mutex := concurrency.NewMutex(session, prefix+"cycle")
	for i := 0; i < *cycles+5; i++ {
		started := time.Now()
		if err := mutex.Lock(ctx); err != nil {
			fail(err)
		}
		if err := mutex.Unlock(ctx); err != nil {
			fail(err)
		}
		if i >= 5 { // warm-up
			out.CycleMs = append(out.CycleMs, ms(time.Since(started)))
		}
	}
	session.Close()

	// 2. handoffs among 1 + waiters contenders, each looping Lock → work → Unlock
	var mu sync.Mutex
	var releasedAt time.Time
	done := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for c := 0; c <= *waiters; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := concurrency.NewSession(client, concurrency.WithTTL(30))
			if err != nil {
				fail(err)
			}
			defer s.Close()
			m := concurrency.NewMutex(s, prefix+"handoff")
			for {
				select {
				case <-done:
					return
				default:
				}
				lockCtx, cancel := context.WithCancel(ctx)
				go func() {
					select {
					case <-done:
						cancel()
					case <-lockCtx.Done():
					}
				}()
				err := m.Lock(lockCtx)
				if err != nil {
					cancel()
					return // stopped
				}
				acquired := time.Now()
				mu.Lock()
				if !releasedAt.IsZero() {
					out.HandoffMs = append(out.HandoffMs, ms(acquired.Sub(releasedAt)))
					if len(out.HandoffMs) >= *handoffs {
						once.Do(func() { close(done) })
					}
				}
				mu.Unlock()
				time.Sleep(*hold) // the work
				mu.Lock()
				// the release instant: just before Unlock is sent, as the
				// CRD scenario measures from the holder's delete
				releasedAt = time.Now()
				mu.Unlock()
				_ = m.Unlock(ctx)
				cancel()
			}
		}()
	}
	wg.Wait()
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}
