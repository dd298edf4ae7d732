// healthpod: a grpc-go server that follows grpc_balance_mw's identity contract
// (docs/identity.md): the podidentity interceptors on every call, grpc.health.v1 served through
// them, and a drain on SIGTERM (NOT_SERVING, keep serving DRAIN_SECONDS, then GracefulStop).
//
// Register your own services where marked. So that the recipe runs without generated code,
// every other method is answered by anyMethod: it reads the request messages and answers one
// empty message (enough for a client to count which pod answered).
//
// Usage: POD_NAME=charge-points-0 go run ./cmd/healthpod -listen 0.0.0.0:50051
// It prints "READY <port>" on stdout once it listens (port 0 picks a free one).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/golang/protobuf/ptypes/empty"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"example.com/grpcbalance/podidentity"
)

func seconds(name string, fallback time.Duration) time.Duration {
	value, set := os.LookupEnv(name)
	if !set {
		return fallback
	}
	s, err := strconv.ParseFloat(value, 64)
	if err != nil || s < 0 {
		log.Fatalf("%s must be seconds >= 0, got %q", name, value)
	}
	return time.Duration(s * float64(time.Second))
}

// anyMethod stands in for your services: it answers every method it is given.
func anyMethod(_ any, stream grpc.ServerStream) error {
	for {
		if err := stream.RecvMsg(&empty.Empty{}); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
	}
	return stream.SendMsg(&empty.Empty{})
}

func main() {
	listen := flag.String("listen", "0.0.0.0:50051", "host:port; port 0 picks one")
	flag.Parse()
	id, err := podidentity.FromEnv(os.LookupEnv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthpod:", err)
		os.Exit(2)
	}
	drain := seconds("DRAIN_SECONDS", 10*time.Second)
	grace := seconds("SHUTDOWN_GRACE_SECONDS", 5*time.Second)

	server := grpc.NewServer(
		grpc.ChainUnaryInterceptor(id.UnaryInterceptor()),
		grpc.ChainStreamInterceptor(id.StreamInterceptor()),
		grpc.UnknownServiceHandler(anyMethod),
	)
	healthServer := health.NewServer() // "" is SERVING from the start
	healthpb.RegisterHealthServer(server, healthServer)
	// Register your services here, and report each as SERVING:
	//   chargepointsv1.RegisterChargePointsServer(server, &chargePoints{})
	//   healthServer.SetServingStatus("chargepoints.v1.ChargePoints", healthpb.HealthCheckResponse_SERVING)

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-stop
		log.Printf("%v: NOT_SERVING, draining for %v", sig, drain)
		healthServer.Shutdown() // NOT_SERVING for every service, for good
		time.Sleep(drain)
		done := make(chan struct{})
		go func() { server.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(grace):
			server.Stop()
		}
	}()
	if err := server.Serve(listener); err != nil {
		log.Fatalf("serve: %v", err)
	}
	log.Print("stopped")
}
