// Package podidentity stamps grpc_balance_mw's pod identity contract (docs/identity.md) on every
// response of a grpc-go server: initial metadata and trailers, every call kind, errors included.
//
// Usage:
//
//	id, err := podidentity.FromEnv(os.LookupEnv)
//	if err != nil { log.Fatal(err) }
//	s := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(id.UnaryInterceptor()),
//		grpc.ChainStreamInterceptor(id.StreamInterceptor()),
//	)
//
// The interceptors apply to every service on the server, the grpc.health.v1 one included.
package podidentity

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// The header names of grpc_balance_mw/identity.py.
const (
	PodHeader          = "x-balance-pod"
	PodIPHeader        = "x-balance-pod-ip"
	PodNamespaceHeader = "x-balance-pod-namespace"
	OpaqueKeyEnv       = "GRPC_BALANCE_POD_KEY"
	maxValueLength     = 253
	minOpaqueKeyBytes  = 16
)

// Identity is what a pod says about itself: the metadata it stamps.
type Identity struct {
	md metadata.MD
}

// Name is the value of x-balance-pod (the pod name, or its opaque id).
func (id Identity) Name() string { return id.md.Get(PodHeader)[0] }

// CheckValue returns an error unless the client accepts value: 1-253 printable ASCII, no
// whitespace at either end.
func CheckValue(header, value string) error {
	switch {
	case value == "":
		return fmt.Errorf("%s: empty", header)
	case len(value) > maxValueLength:
		return fmt.Errorf("%s: longer than %d characters", header, maxValueLength)
	case value != strings.TrimSpace(value):
		return fmt.Errorf("%s: leading or trailing whitespace", header)
	}
	for i := 0; i < len(value); i++ {
		if value[i] < 0x20 || value[i] > 0x7e {
			return fmt.Errorf("%s: byte %#x is not printable ASCII", header, value[i])
		}
	}
	return nil
}

// OpaqueName is "pod-" + the first 16 hex digits of HMAC-SHA256(key, namespace + "/" + name).
func OpaqueName(key, namespace, name string) (string, error) {
	if strings.TrimSpace(key) == "" {
		return "", fmt.Errorf("%s: empty or blank", OpaqueKeyEnv)
	}
	if key != strings.TrimSpace(key) {
		return "", fmt.Errorf("%s: leading or trailing whitespace", OpaqueKeyEnv)
	}
	if len(key) < minOpaqueKeyBytes {
		return "", fmt.Errorf("%s: %d bytes, needs %d or more (openssl rand -hex 16)",
			OpaqueKeyEnv, len(key), minOpaqueKeyBytes)
	}
	mac := hmac.New(sha256.New, []byte(key))
	mac.Write([]byte(namespace + "/" + name))
	return "pod-" + hex.EncodeToString(mac.Sum(nil))[:16], nil
}

// FromEnv reads the identity the downward API puts in the environment: POD_NAME (HOSTNAME as a
// fallback), POD_IP, POD_NAMESPACE; opaque when GRPC_BALANCE_POD_KEY is set at all (a set but
// unusable key is an error, never a fall-back to the real name). Pass os.LookupEnv: it tells
// "set but empty" from "unset" for the key.
func FromEnv(lookup func(string) (string, bool)) (Identity, error) {
	getenv := func(key string) string { value, _ := lookup(key); return value }
	name := getenv("POD_NAME")
	if name == "" {
		name = getenv("HOSTNAME")
	}
	if name == "" {
		return Identity{}, fmt.Errorf("no pod identity: set POD_NAME from the downward API (metadata.name)")
	}
	ip, namespace := getenv("POD_IP"), getenv("POD_NAMESPACE")
	if err := CheckValue(PodHeader, name); err != nil {
		return Identity{}, err
	}
	if ip != "" {
		if err := CheckValue(PodIPHeader, ip); err != nil {
			return Identity{}, err
		}
		if net.ParseIP(ip) == nil {
			return Identity{}, fmt.Errorf("%s: %q is not an IP address", PodIPHeader, ip)
		}
	}
	if namespace != "" {
		if err := CheckValue(PodNamespaceHeader, namespace); err != nil {
			return Identity{}, err
		}
	}
	if key, set := lookup(OpaqueKeyEnv); set {
		opaque, err := OpaqueName(key, namespace, name)
		if err != nil {
			return Identity{}, err
		}
		return Identity{md: metadata.Pairs(PodHeader, opaque)}, nil
	}
	md := metadata.Pairs(PodHeader, name)
	if ip != "" {
		md.Set(PodIPHeader, ip)
	}
	if namespace != "" {
		md.Set(PodNamespaceHeader, namespace)
	}
	return Identity{md: md}, nil
}

// UnaryInterceptor stamps unary calls. The header is set before the handler runs: grpc-go then
// sends a header frame of its own even when the handler fails, instead of a trailers-only
// response with nothing in the initial metadata. Handlers must not set x-balance-pod* keys
// themselves (grpc-go appends metadata, it cannot replace what was set here).
func (id Identity) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := grpc.SetHeader(ctx, id.md); err != nil {
			return nil, err
		}
		if err := grpc.SetTrailer(ctx, id.md); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// StreamInterceptor stamps the three streaming call kinds the same way.
func (id Identity) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := ss.SetHeader(id.md); err != nil {
			return err
		}
		ss.SetTrailer(id.md)
		return handler(srv, ss)
	}
}
