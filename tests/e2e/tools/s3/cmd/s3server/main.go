// Command s3server serves an in-memory S3-compatible API on a loopback
// address, with one bucket created up front, for the e2e suite's Velero.
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"strings"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback only)")
	buckets := flag.String("buckets", "velero", "comma-separated buckets to create")
	// The cluster mode's Velero runs in a pod and reaches the store at the
	// host's address; the suite asks for that explicitly.
	nonLoopback := flag.Bool("allow-non-loopback", false, "also listen on a non-loopback address (the cluster mode)")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if err != nil || (!*nonLoopback && !net.ParseIP(host).IsLoopback()) {
		log.Fatalf("s3server: refusing non-loopback listen address %q", *listen)
	}
	backend := s3mem.New()
	for _, bucket := range strings.Split(*buckets, ",") {
		if err := backend.CreateBucket(bucket); err != nil {
			log.Fatalf("s3server: create bucket %s: %v", bucket, err)
		}
	}
	faker := gofakes3.New(backend)
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("s3server: %v", err)
	}
	log.Printf("s3server: listening on %s", listener.Addr())
	log.Fatal(http.Serve(listener, faker.Server()))
}
