package daemon

import (
	"context"
	"fmt"
	"runtime/debug"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Neither ttrpc nor gRPC recovers a panic in a request handler: the
// daemon, and every pod it serves, would end with one bad request. These
// interceptors turn it into an Internal error for that request alone,
// logged with its stack.

// RecoverTTRPC is the ttrpc server option that does it.
func RecoverTTRPC(log *zap.Logger) ttrpc.ServerOpt {
	return ttrpc.WithUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (_ any, err error) {
		defer recoverTo(&err, log, info.FullMethod)
		return method(ctx, unmarshal)
	})
}

// RecoverGRPC is the gRPC server option that does it.
func RecoverGRPC(log *zap.Logger) grpc.ServerOption {
	return grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (_ any, err error) {
		defer recoverTo(&err, log, info.FullMethod)
		return handler(ctx, req)
	})
}

func recoverTo(err *error, log *zap.Logger, method string) {
	if v := recover(); v != nil {
		log.Error("panic in request handler", zap.String("method", method), zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
		*err = errgrpc.ToGRPC(fmt.Errorf("%s: internal error (panic: %v): %w", method, v, errdefs.ErrInternal))
	}
}
