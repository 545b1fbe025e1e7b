;; trap.wasm: `_start` executes `unreachable`. Fixture for a job that traps.
(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))
