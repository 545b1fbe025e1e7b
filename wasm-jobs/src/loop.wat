;; loop.wasm: never returns. Fixture for executor timeouts; `_start` for WASI-style
;; runs, `spin` for --invoke runs. No imports, so nothing host-side can end it.
(module
  (memory (export "memory") 1)
  (func $spin (export "spin")
    (loop $forever (br $forever)))
  (func (export "_start") (call $spin)))
