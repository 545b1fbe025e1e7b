;; copy.wasm, for bench/files.py: the same bytes in and out, as files or through stdin/stdout.
;; When /inputs/in.bin opens (the first preopened directory, fd 3), it copies it to
;; /outputs/out.bin (the second, fd 4: O_CREAT|O_TRUNC); otherwise it copies stdin (fd 0) to
;; stdout (fd 1). Either way in 64 KiB chunks until EOF. Exits 1 when a WASI call fails.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  ;; 16: "in.bin"; 32: "out.bin"; 64: an opened fd; 72: iovec {ptr, len}; 80: bytes moved;
  ;; 65536..131072: the 64 KiB buffer
  (memory (export "memory") 2)
  (data (i32.const 16) "in.bin")
  (data (i32.const 32) "out.bin")
  (func $check (param i32) (if (local.get 0) (then (call $proc_exit (i32.const 1)))))
  (func $copy (param $in i32) (param $out i32)
    (local $n i32) (local $ptr i32) (local $w i32)
    (block $eof (loop $chunk
      (i32.store (i32.const 72) (i32.const 65536))
      (i32.store (i32.const 76) (i32.const 65536))
      (call $check (call $fd_read (local.get $in) (i32.const 72) (i32.const 1) (i32.const 80)))
      (local.set $n (i32.load (i32.const 80)))
      (br_if $eof (i32.eqz (local.get $n)))
      ;; write the chunk whole: fd_write may take less than it is given
      (local.set $ptr (i32.const 65536))
      (loop $more
        (i32.store (i32.const 72) (local.get $ptr))
        (i32.store (i32.const 76) (local.get $n))
        (call $check (call $fd_write (local.get $out) (i32.const 72) (i32.const 1) (i32.const 80)))
        (local.set $w (i32.load (i32.const 80)))
        (if (i32.eqz (local.get $w)) (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $w)))
        (local.set $n (i32.sub (local.get $n) (local.get $w)))
        (br_if $more (local.get $n)))
      (br $chunk))))
  (func (export "_start")
    (local $in i32) (local $out i32)
    ;; /inputs/in.bin for reading (FD_READ); no such file or no preopen: stdin -> stdout
    (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 6)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 64)))
      (then
        (local.set $in (i32.load (i32.const 64)))
        ;; /outputs/out.bin, created or truncated (O_CREAT|O_TRUNC), for writing (FD_WRITE)
        (call $check (call $path_open (i32.const 4) (i32.const 0) (i32.const 32) (i32.const 7)
          (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 64)))
        (local.set $out (i32.load (i32.const 64)))
        (call $copy (local.get $in) (local.get $out))
        (call $check (call $fd_close (local.get $in)))
        (call $check (call $fd_close (local.get $out))))
      (else (call $copy (i32.const 0) (i32.const 1))))))
