// lease-peer measures the handoff latency of client-go leader election on a
// Lease: the time from the holder releasing the lease (ReleaseOnCancel) to the
// next candidate leading. Two candidates in one process, same API server.
//
// Usage: lease-peer -kubeconfig PATH -namespace NS -handoffs 50
// Prints one JSON object: {"samples_ms": [...], "lease_duration_s": ..., ...}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

type result struct {
	SamplesMs      []float64 `json:"samples_ms"`
	LeaseDurationS float64   `json:"lease_duration_s"`
	RenewDeadlineS float64   `json:"renew_deadline_s"`
	RetryPeriodS   float64   `json:"retry_period_s"`
}

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig")
	namespace := flag.String("namespace", "default", "namespace of the Lease")
	handoffs := flag.Int("handoffs", 50, "handoffs to measure")
	hold := flag.Duration("hold", 50*time.Millisecond, "how long each leader works before releasing")
	flag.Parse()
	klog.SetOutput(os.Stderr)
	klog.LogToStderr(true)

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, "lease-peer:", err)
		os.Exit(2)
	}
	config.QPS, config.Burst = 1000, 1000
	client := kubernetes.NewForConfigOrDie(config)
	name := fmt.Sprintf("lease-peer-%d", time.Now().UnixNano())

	// client-go's documented defaults.
	const leaseDuration, renewDeadline, retryPeriod = 15 * time.Second, 10 * time.Second, 2 * time.Second

	var mu sync.Mutex
	var releasedAt time.Time
	var samples []float64
	done := make(chan struct{})
	var once sync.Once

	candidate := func(identity string) {
		for {
			select {
			case <-done:
				return
			default:
			}
			ctx, cancel := context.WithCancel(context.Background())
			lock := &resourcelock.LeaseLock{
				LeaseMeta:  metav1.ObjectMeta{Name: name, Namespace: *namespace},
				Client:     client.CoordinationV1(),
				LockConfig: resourcelock.ResourceLockConfig{Identity: identity},
			}
			leaderelection.RunOrDie(ctx, leaderelection.LeaderElectionConfig{
				Lock:            lock,
				ReleaseOnCancel: true,
				LeaseDuration:   leaseDuration,
				RenewDeadline:   renewDeadline,
				RetryPeriod:     retryPeriod,
				Callbacks: leaderelection.LeaderCallbacks{
					OnStartedLeading: func(ctx context.Context) {
						mu.Lock()
						if !releasedAt.IsZero() {
							samples = append(samples, float64(time.Since(releasedAt).Microseconds())/1000)
							releasedAt = time.Time{}
							if len(samples) >= *handoffs {
								once.Do(func() { close(done) })
							}
						}
						mu.Unlock()
						time.Sleep(*hold)
						cancel() // give the lock up; RunOrDie releases the lease
					},
					OnStoppedLeading: func() {
						mu.Lock()
						releasedAt = time.Now()
						mu.Unlock()
					},
				},
			})
			cancel()
			// Let the other candidate have its turn before competing again.
			time.Sleep(retryPeriod * 3 / 2)
		}
	}
	go candidate("peer-a")
	go candidate("peer-b")
	<-done
	out, _ := json.Marshal(result{samples, leaseDuration.Seconds(), renewDeadline.Seconds(), retryPeriod.Seconds()})
	fmt.Println(string(out))
}
