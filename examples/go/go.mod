module example.com/grpcbalance

go 1.19

require (
	github.com/golang/protobuf v1.5.4
	google.golang.org/grpc v1.67.1
)
