//go:build !linux

package engine

import "context"

func withMemoryAllocator(ctx context.Context) context.Context { return ctx }
