//go:build cgo

package wasmtimerunner

import (
	"encoding/json"
	"math"
	"os"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// guarded is a copy of data that ends where an inaccessible page begins:
// the C reader reading past its end dies of SIGSEGV, also in a run without
// AddressSanitizer (hack/fuzz.sh fuzzes with it).
func guarded(t testing.TB, data []byte) []byte {
	t.Helper()
	ps := os.Getpagesize()
	n := (len(data) + ps - 1) / ps * ps
	mem, err := unix.Mmap(-1, 0, n+ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	if err := unix.Mprotect(mem[n:], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	// Its capacity runs into the guard page: the C reader gets &b[0] even
	// when data is empty.
	b := mem[n-len(data) : n]
	copy(b, data)
	return b
}

// normal is cfg as the C reader can have it: no key, no empty list.
func normal(cfg runner.RunConfig) runner.RunConfig {
	cfg.Key = ""
	if len(cfg.Args) == 0 {
		cfg.Args = nil
	}
	if len(cfg.Env) == 0 {
		cfg.Env = nil
	}
	return cfg
}

// daemonConfig is what wasmrt writes for a container with every field.
var daemonConfig = runner.RunConfig{
	Engine:      "wasmtime",
	Key:         strings.Repeat("0123456789abcdef", 4),
	Cached:      true,
	Args:        []string{"/app.wasm", "a b", `"quoted" \ back`, "<&>", "\u2028\u2029", "tab\there", "é😀"},
	Env:         []string{"PATH=/usr/bin", "PWD=/work", "EMPTY="},
	MemoryLimit: 256 << 20,
}

func marshal(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

type parseCase struct {
	name string
	in   string
	want *runner.RunConfig // nil: refused
	err  string            // what the error says
}

func parseCases(t testing.TB) []parseCase {
	ok := func(c runner.RunConfig) *runner.RunConfig { return &c }
	return []parseCase{
		{name: "daemon", in: marshal(t, daemonConfig), want: ok(normal(daemonConfig))},
		{name: "daemon, no cache, no env", in: marshal(t, runner.RunConfig{Engine: "wasmtime", Key: "k", Args: []string{"m.wasm"}}),
			want: ok(runner.RunConfig{Engine: "wasmtime", Args: []string{"m.wasm"}})},
		{name: "daemon, nil args", in: marshal(t, runner.RunConfig{Engine: "wasmtime"}), want: ok(runner.RunConfig{Engine: "wasmtime"})},
		{name: "empty object", in: " {\t}\r\n", want: ok(runner.RunConfig{})},
		{name: "nulls", in: `{"engine":null,"key":null,"cached":null,"args":null,"env":null,"memory_limit":null}`, want: ok(runner.RunConfig{})},
		{name: "false, empty lists, zero", in: `{"cached":false,"args":[],"env":[ ],"memory_limit":0}`, want: ok(runner.RunConfig{})},
		{name: "white space", in: "{ \"args\" :\n[ \"a\" , \"b\" ] ,\"cached\": true }", want: ok(runner.RunConfig{Cached: true, Args: []string{"a", "b"}})},
		{name: "escapes", in: `{"args":["\"\\\/\b\f\n\r\t","\u00e9\u20AC\ud83d\ude00"]}`,
			want: ok(runner.RunConfig{Args: []string{"\"\\/\b\f\n\r\t", "é€😀"}})},
		{name: "escaped key", in: `{"\u0065ngine":"wasmtime"}`, want: ok(runner.RunConfig{Engine: "wasmtime"})},
		{name: "lone surrogates", in: `{"args":["\ud800","\udc00x","\ud800\u0041","\udbff\udbff\udfff","\ud800\\"]}`,
			want: ok(runner.RunConfig{Args: []string{"\ufffd", "\ufffdx", "\ufffdA", "\ufffd\U0010ffff", "\ufffd\\"}})},
		{name: "largest memory limit", in: `{"memory_limit":9223372036854775807}`, want: ok(runner.RunConfig{MemoryLimit: math.MaxInt64})},

		// encoding/json would read these otherwise than the old reader.
		{name: "raw NUL in a string", in: "{\"args\":[\"a\x00b\"]}", err: "control character"},
		{name: "raw newline in a string", in: "{\"args\":[\"a\nb\"]}", err: "control character"},
		{name: "invalid UTF-8", in: "{\"args\":[\"\xff\"]}", err: "invalid UTF-8"},
		{name: "overlong UTF-8", in: "{\"args\":[\"\xc0\xaf\"]}", err: "invalid UTF-8"},
		{name: "UTF-8 surrogate", in: "{\"args\":[\"\xed\xa0\x80\"]}", err: "invalid UTF-8"},
		{name: "UTF-8 above U+10FFFF", in: "{\"args\":[\"\xf4\x90\x80\x80\"]}", err: "invalid UTF-8"},
		{name: "UTF-8 cut by the quote", in: "{\"args\":[\"\xe2\x82\"]}", err: "invalid UTF-8"},
		{name: "duplicate key", in: `{"cached":true,"cached":false}`, err: "duplicate key at byte 15"},
		{name: "key in another case", in: `{"Cached":true}`, err: "unknown key at byte 1"},
		{name: "key folded", in: `{"arg` + "\u017f" + `":["x"]}`, err: "unknown key"},
		{name: "unknown key", in: `{"engine":"wasmtime","x":1}`, err: "unknown key"},
		{name: "memory limit above uint64", in: `{"memory_limit":18446744073709551616}`, err: "out of range"},
		{name: "memory limit above int64", in: `{"memory_limit":9223372036854775808}`, err: "out of range"},
		{name: "negative", in: `{"memory_limit":-1}`, err: "expected an integer"},
		{name: "fraction", in: `{"memory_limit":1.5}`, err: "expected an integer"},
		{name: "exponent", in: `{"memory_limit":1e3}`, err: "expected an integer"},
		{name: "leading zero", in: `{"memory_limit":01}`, err: "leading zero"},
		{name: "data after the object", in: `{"engine":"wasmtime"}{"engine":"other"}`, err: "data after the object"},
		{name: "not a boolean", in: `{"cached":"yes"}`, err: "expected true or false"},
		{name: "bare word", in: `{"cached":tru}`, err: "expected true or false"},
		{name: "literal run on", in: `{"cached":truex}`, err: "expected ',' or '}'"},
		{name: "deep nesting", in: `{"x":` + strings.Repeat("[", 1<<20), err: "unknown key"},
		{name: "missing value", in: `{"key":}`, err: "expected a string"},
		{name: "missing boolean", in: `{"cached":}`, err: "expected true or false"},
		{name: "missing number", in: `{"memory_limit":}`, err: "expected an integer"},
		{name: "nested value", in: `{"args":[["a"]]}`, err: "expected a string"},
		{name: "null element", in: `{"args":["a",null]}`, err: "expected a string"},

		// Refused by both.
		{name: "escaped NUL", in: `{"args":["a\u0000b"]}`, err: "NUL in a string"},
		{name: "bad escape", in: `{"args":["\x"]}`, err: "bad escape"},
		{name: "bad \\u", in: `{"args":["\u12G4"]}`, err: "bad \\u escape"},
		{name: "short \\u", in: `{"args":["\u12"]}`, err: "bad \\u escape"},
		{name: "empty", in: ``, err: "expected an object at byte 0"},
		{name: "top-level null", in: `null`, err: "expected an object"},
		{name: "trailing comma", in: `{"args":["a",]}`, err: "expected a string"},
		{name: "trailing comma in the object", in: `{"cached":true,}`, err: "expected a string"},
		{name: "missing colon", in: `{"cached" true}`, err: "expected ':'"},
		{name: "missing comma", in: `{"cached":true "args":[]}`, err: "expected ',' or '}'"},
		{name: "truncated object", in: `{"cached":true`, err: "expected ',' or '}'"},
		{name: "truncated array", in: `{"args":["a"`, err: "expected ',' or ']'"},
		{name: "truncated string", in: `{"args":["a`, err: "unterminated string"},
		{name: "truncated escape", in: `{"args":["a\`, err: "unterminated string"},
		{name: "truncated \\u", in: `{"args":["\u00`, err: "unterminated string"},
		{name: "truncated pair", in: `{"args":["\ud800\udc`, err: "unterminated string"},
		{name: "truncated null", in: `{"engine":nul`, err: "expected a string"},
	}
}

func TestParseConfig(t *testing.T) {
	for _, tc := range parseCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseConfig(guarded(t, []byte(tc.in)))
			if tc.want == nil {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseConfig = %+v, %v; want an error with %q", got, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			if !reflect.DeepEqual(got, *tc.want) {
				t.Fatalf("parseConfig = %+v, want %+v", got, *tc.want)
			}
		})
	}
}

// TestParseConfigEveryField: the C reader knows every field the daemon
// writes; a field added to runner.RunConfig fails here until config.c
// reads it.
func TestParseConfigEveryField(t *testing.T) {
	var cfg runner.RunConfig
	v := reflect.ValueOf(&cfg).Elem()
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Uint64:
			f.SetUint(1)
		case reflect.Slice:
			f.Set(reflect.ValueOf([]string{"y"}))
		default:
			t.Fatalf("RunConfig.%s: a %s, which this test does not fill", v.Type().Field(i).Name, f.Kind())
		}
	}
	got, err := parseConfig(guarded(t, []byte(marshal(t, cfg))))
	if err != nil {
		t.Fatalf("parseConfig(%s): %v", marshal(t, cfg), err)
	}
	if want := normal(cfg); !reflect.DeepEqual(got, want) {
		t.Fatalf("parseConfig = %+v, want %+v", got, want)
	}
}

// FuzzParseConfig: whatever the C reader accepts, encoding/json reads the
// same; it never reads outside the input (guarded; AddressSanitizer under
// hack/fuzz.sh), nor crashes or hangs.
func FuzzParseConfig(f *testing.F) {
	for _, tc := range parseCases(f) {
		f.Add([]byte(tc.in))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := parseConfig(guarded(t, data))
		if err != nil {
			return
		}
		var want runner.RunConfig
		if err := json.Unmarshal(data, &want); err != nil {
			t.Fatalf("the C reader accepts %q, encoding/json does not: %v", data, err)
		}
		if want = normal(want); !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: the C reader reads %+v, encoding/json %+v", data, got, want)
		}
	})
}

// FuzzParseConfigEncoded: the C reader reads whatever the daemon can write
// as encoding/json does, but for what it cannot represent: a NUL in a
// string, a memory limit above INT64_MAX.
func FuzzParseConfigEncoded(f *testing.F) {
	f.Add("wasmtime", "k", true, "/app.wasm\x00a b", "A=1\x00PWD=/", uint64(256<<20))
	f.Add("", "", false, "", "", uint64(0))
	f.Add("wasmtime", "k", false, "\"\\/\b\f\n\r\t<>&\u2028\x7f", "\xff\xed\xa0\x80\U0010ffff", uint64(math.MaxInt64))
	f.Add("wasm\x00time", "k\x00", false, "a", "b", uint64(math.MaxUint64))
	f.Fuzz(func(t *testing.T, engine, key string, cached bool, args, env string, memoryLimit uint64) {
		// NUL separates the elements: none has one.
		split := func(s string) []string {
			if s == "" {
				return nil
			}
			return strings.Split(s, "\x00")
		}
		data := marshal(t, runner.RunConfig{Engine: engine, Key: key, Cached: cached, Args: split(args), Env: split(env), MemoryLimit: memoryLimit})
		got, err := parseConfig(guarded(t, []byte(data)))
		if strings.Contains(engine+key, "\x00") || memoryLimit > math.MaxInt64 {
			if err == nil {
				t.Fatalf("the C reader accepts %s as %+v", data, got)
			}
			return
		}
		if err != nil {
			t.Fatalf("the C reader refuses %s: %v", data, err)
		}
		var want runner.RunConfig
		if err := json.Unmarshal([]byte(data), &want); err != nil {
			t.Fatal(err)
		}
		if want = normal(want); !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: the C reader reads %+v, encoding/json %+v", data, got, want)
		}
	})
}
