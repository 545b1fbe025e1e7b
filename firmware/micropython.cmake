# All of DEparrow's user C modules (one today): USER_C_MODULES=path/to/firmware/micropython.cmake
include(${CMAKE_CURRENT_LIST_DIR}/wasm3/micropython.cmake)
