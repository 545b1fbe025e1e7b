;; grow.wasm: grows linear memory 16 pages (1 MiB) at a time until memory.grow
;; fails, then traps. Fixture for memory caps: the memory declares no maximum, so
;; only the host's limit stops it. Each new page is written to, so the host
;; really commits what it granted (an overcommitting allocator cannot hide it).
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $old i32) (local $addr i32) (local $end i32)
    (loop $more
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1))
        (then unreachable))
      ;; touch one byte in each new 64 KiB page
      (local.set $addr (i32.mul (local.get $old) (i32.const 65536)))
      (local.set $end (i32.add (local.get $addr) (i32.const 1048576)))
      (loop $touch
        (i32.store8 (local.get $addr) (i32.const 1))
        (local.set $addr (i32.add (local.get $addr) (i32.const 65536)))
        (br_if $touch (i32.lt_u (local.get $addr) (local.get $end))))
      (br $more))))
