// Command probe is the client pod of the cluster mode's NetworkPolicy
// scenarios. Each round it tries every target once and prints one JSON line
// of what happened; it runs rounds until stopped (or -rounds of them). A
// target is https://IP:PORT/PATH (a POST of an empty AdmissionReview, the
// certificate not verified: only reachability counts) or
// http://IP:PORT/PATH (a GET). A try is "admitted" when any HTTP answer
// comes back, "refused" when the connection fails or times out.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

type try struct {
	Target   string `json:"target"`
	Admitted bool   `json:"admitted"`
	Status   int    `json:"status,omitempty"`
	Error    string `json:"error,omitempty"`
}

func main() {
	rounds := flag.Int("rounds", 0, "rounds to run (0: until stopped)")
	interval := flag.Duration("interval", time.Second, "pause between rounds")
	timeout := flag.Duration("timeout", 2*time.Second, "per try")
	flag.Parse()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	client := &http.Client{
		Timeout: *timeout,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // reachability only
			DisableKeepAlives: true,
		},
	}
	for round := 1; *rounds == 0 || round <= *rounds; round++ {
		var tries []try
		for _, target := range flag.Args() {
			t := try{Target: target}
			var resp *http.Response
			var err error
			if strings.HasPrefix(target, "https://") {
				body := []byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`)
				resp, err = client.Post(target, "application/json", bytes.NewReader(body))
			} else {
				resp, err = client.Get(target)
			}
			if err != nil {
				t.Error = err.Error()
			} else {
				resp.Body.Close()
				t.Admitted, t.Status = true, resp.StatusCode
			}
			tries = append(tries, t)
		}
		line, _ := json.Marshal(map[string]any{"round": round, "at": time.Now().UTC().Format(time.RFC3339Nano), "tries": tries})
		fmt.Println(string(line))
		select {
		case <-stop:
			return
		case <-time.After(*interval):
		}
	}
}
