package engine

import (
	"reflect"
	"unsafe"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
)

// wazero keeps the decoded module for the life of the compiled module and
// of its instances: the function bodies (about 2 MiB for the 2.7 MB Go
// test program) although the compiled code is what runs, and the bytes of
// the data segments (about 2.6 MiB), also referenced by the instance,
// although an active segment is copied into the linear memory at
// instantiation and, per the WebAssembly spec, dropped then. In a module
// process, which instantiates its module once, that is most of its Go
// heap. releaseDecoded drops both after instantiation, through reflection
// on wazero's internal types (wazero v1.12: compiledModule.module,
// wasm.Module's CodeSection[].Body and DataSection[].Init/Passive,
// wasm.ModuleInstance's DataInstances); it does nothing where these are
// not found as expected, so a wazero upgrade can only lose the saving.
// Passive segments, which memory.init may still copy, are kept.
// DataInstances entries are cleared in place: compiled code holds the
// address of the slice's first element. After it, the compiled module
// must not be instantiated again.
func releaseDecoded(cm wazero.CompiledModule, mod api.Module) bool {
	module := fieldOf(reflect.ValueOf(cm), "module")
	inst := reflect.ValueOf(mod)
	if !module.IsValid() || module.Kind() != reflect.Pointer || module.IsNil() || inst.Kind() != reflect.Pointer || inst.IsNil() {
		return false
	}
	m := module.Elem()
	code, data := m.FieldByName("CodeSection"), m.FieldByName("DataSection")
	dataInst := inst.Elem().FieldByName("DataInstances")
	if !code.IsValid() || code.Kind() != reflect.Slice || !data.IsValid() || data.Kind() != reflect.Slice ||
		!dataInst.IsValid() || dataInst.Kind() != reflect.Slice || dataInst.Len() != data.Len() {
		return false
	}
	bytesType := reflect.TypeOf([]byte(nil))
	for i := 0; i < code.Len(); i++ {
		body := code.Index(i).FieldByName("Body")
		if !body.IsValid() || body.Type() != bytesType || !body.CanSet() {
			return false
		}
	}
	for i := 0; i < data.Len(); i++ {
		seg := data.Index(i)
		init, passive := seg.FieldByName("Init"), seg.FieldByName("Passive")
		if !init.IsValid() || init.Type() != bytesType || !init.CanSet() || !passive.IsValid() || passive.Kind() != reflect.Bool {
			return false
		}
	}
	if dataInst.Type().Elem() != bytesType {
		return false
	}
	dataInst = settable(dataInst)
	for i := 0; i < code.Len(); i++ {
		code.Index(i).FieldByName("Body").SetZero()
	}
	for i := 0; i < data.Len(); i++ {
		seg := data.Index(i)
		if seg.FieldByName("Passive").Bool() {
			continue
		}
		seg.FieldByName("Init").SetZero()
		dataInst.Index(i).SetZero()
	}
	return true
}

// fieldOf returns the named field of the struct v points to (an interface
// holding a pointer), made settable.
func fieldOf(v reflect.Value, name string) reflect.Value {
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return reflect.Value{}
	}
	f := v.Elem().FieldByName(name)
	if !f.IsValid() {
		return f
	}
	return settable(f)
}

// settable makes an addressable value reached through unexported fields
// settable.
func settable(v reflect.Value) reflect.Value {
	if !v.CanAddr() {
		return v
	}
	return reflect.NewAt(v.Type(), unsafe.Pointer(v.UnsafeAddr())).Elem()
}
