//! ABI constants and the table of every host function this host links.
//!
//! The table is the single source of truth: each backend links exactly these
//! (module, name, signature) triples, filtered by the module's ABI version.

use crate::bytecode::AbiVersion;
use crate::runtime::{FuncType, HostFunc, ValType};

/// `proxy_status_t`.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// Not found.
    pub const NOT_FOUND: i32 = 1;
    /// Bad argument.
    pub const BAD_ARGUMENT: i32 = 2;
    /// Serialization failure.
    pub const SERIALIZATION_FAILURE: i32 = 3;
    /// Parse failure.
    pub const PARSE_FAILURE: i32 = 4;
    /// A guest pointer is outside linear memory.
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    /// Empty (shared queue).
    pub const EMPTY: i32 = 7;
    /// CAS mismatch (shared data).
    pub const CAS_MISMATCH: i32 = 8;
    /// Internal failure.
    pub const INTERNAL_FAILURE: i32 = 10;
    /// Unimplemented.
    pub const UNIMPLEMENTED: i32 = 12;
}

/// `proxy_buffer_type_t`.
pub mod buffer {
    /// HTTP request body.
    pub const HTTP_REQUEST_BODY: i32 = 0;
    /// HTTP response body.
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    /// TCP downstream data.
    pub const DOWNSTREAM_DATA: i32 = 2;
    /// TCP upstream data.
    pub const UPSTREAM_DATA: i32 = 3;
    /// HTTP callout response body.
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    /// gRPC callout message.
    pub const GRPC_CALL_MESSAGE: i32 = 5;
    /// VM configuration.
    pub const VM_CONFIGURATION: i32 = 6;
    /// Plugin configuration.
    pub const PLUGIN_CONFIGURATION: i32 = 7;
    /// Foreign function arguments.
    pub const FOREIGN_FUNCTION_ARGUMENTS: i32 = 8;
}

/// `proxy_map_type_t`.
pub mod map {
    /// HTTP request headers.
    pub const HTTP_REQUEST_HEADERS: i32 = 0;
    /// HTTP request trailers.
    pub const HTTP_REQUEST_TRAILERS: i32 = 1;
    /// HTTP response headers.
    pub const HTTP_RESPONSE_HEADERS: i32 = 2;
    /// HTTP response trailers.
    pub const HTTP_RESPONSE_TRAILERS: i32 = 3;
    /// gRPC callout initial metadata.
    pub const GRPC_CALL_INITIAL_METADATA: i32 = 4;
    /// gRPC callout trailing metadata.
    pub const GRPC_CALL_TRAILING_METADATA: i32 = 5;
    /// HTTP callout response headers.
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    /// HTTP callout response trailers.
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// `proxy_stream_type_t` (0.2.0+).
pub mod stream {
    /// HTTP request direction.
    pub const HTTP_REQUEST: i32 = 0;
    /// HTTP response direction.
    pub const HTTP_RESPONSE: i32 = 1;
    /// TCP downstream.
    pub const DOWNSTREAM: i32 = 2;
    /// TCP upstream.
    pub const UPSTREAM: i32 = 3;
}

/// WASI errno values the host returns.
pub mod errno {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Bad file descriptor.
    pub const BADF: i32 = 8;
    /// Not a directory.
    pub const NOTDIR: i32 = 20;
    /// Bad address.
    pub const FAULT: i32 = 21;
    /// Invalid argument.
    pub const INVAL: i32 = 28;
    /// No such file.
    pub const NOENT: i32 = 44;
    /// Function not implemented.
    pub const NOSYS: i32 = 52;
    /// Not supported.
    pub const NOTSUP: i32 = 58;
}

use ValType::{I32, I64};

macro_rules! host_functions {
    ($( $id:ident = $module:literal $name:literal ($($p:ident),*) -> ($($r:ident),*) [$versions:expr]; )*) => {
        /// Identifies a host function in dispatch.
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum HostFn { $($id,)* }

        impl HostFn {
            /// All host functions, in id order.
            pub const ALL: &'static [HostFn] = &[$(HostFn::$id,)*];

            /// Import module, name, params, results, versions.
            pub fn spec(self) -> (&'static str, &'static str, &'static [ValType], &'static [ValType], Versions) {
                match self {
                    $(HostFn::$id => ($module, $name, &[$($p),*], &[$($r),*], $versions),)*
                }
            }

            /// The function for a dispatch id.
            pub fn from_id(id: u32) -> Option<HostFn> {
                HostFn::ALL.get(id as usize).copied()
            }
        }
    };
}

/// Which ABI versions link a host function.
#[derive(Clone, Copy, Debug)]
pub struct Versions {
    v010: bool,
    v020: bool,
    v021: bool,
}

const ALL: Versions = Versions {
    v010: true,
    v020: true,
    v021: true,
};
const V010: Versions = Versions {
    v010: true,
    v020: false,
    v021: false,
};
const V02X: Versions = Versions {
    v010: false,
    v020: true,
    v021: true,
};
const V021: Versions = Versions {
    v010: false,
    v020: false,
    v021: true,
};

impl Versions {
    fn contains(self, v: AbiVersion) -> bool {
        match v {
            AbiVersion::V0_1_0 => self.v010,
            AbiVersion::V0_2_0 => self.v020,
            AbiVersion::V0_2_1 => self.v021,
        }
    }
}

host_functions! {
    Log = "env" "proxy_log" (I32, I32, I32) -> (I32) [ALL];
    GetLogLevel = "env" "proxy_get_log_level" (I32) -> (I32) [V021];
    GetCurrentTimeNanoseconds = "env" "proxy_get_current_time_nanoseconds" (I32) -> (I32) [ALL];
    SetTickPeriodMilliseconds = "env" "proxy_set_tick_period_milliseconds" (I32) -> (I32) [ALL];
    GetConfiguration = "env" "proxy_get_configuration" (I32, I32) -> (I32) [V010];
    GetBufferBytes = "env" "proxy_get_buffer_bytes" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    GetBufferStatus = "env" "proxy_get_buffer_status" (I32, I32, I32) -> (I32) [ALL];
    SetBufferBytes = "env" "proxy_set_buffer_bytes" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    GetHeaderMapSize = "env" "proxy_get_header_map_size" (I32, I32) -> (I32) [ALL];
    GetHeaderMapPairs = "env" "proxy_get_header_map_pairs" (I32, I32, I32) -> (I32) [ALL];
    SetHeaderMapPairs = "env" "proxy_set_header_map_pairs" (I32, I32, I32) -> (I32) [ALL];
    GetHeaderMapValue = "env" "proxy_get_header_map_value" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    AddHeaderMapValue = "env" "proxy_add_header_map_value" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    ReplaceHeaderMapValue = "env" "proxy_replace_header_map_value" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    RemoveHeaderMapValue = "env" "proxy_remove_header_map_value" (I32, I32, I32) -> (I32) [ALL];
    GetProperty = "env" "proxy_get_property" (I32, I32, I32, I32) -> (I32) [ALL];
    SetProperty = "env" "proxy_set_property" (I32, I32, I32, I32) -> (I32) [ALL];
    GetStatus = "env" "proxy_get_status" (I32, I32, I32) -> (I32) [ALL];
    SendLocalResponse = "env" "proxy_send_local_response" (I32, I32, I32, I32, I32, I32, I32, I32) -> (I32) [ALL];
    ContinueRequest = "env" "proxy_continue_request" () -> (I32) [V010];
    ContinueResponse = "env" "proxy_continue_response" () -> (I32) [V010];
    ClearRouteCache = "env" "proxy_clear_route_cache" () -> (I32) [V010];
    ContinueStream = "env" "proxy_continue_stream" (I32) -> (I32) [V02X];
    CloseStream = "env" "proxy_close_stream" (I32) -> (I32) [V02X];
    HttpCall = "env" "proxy_http_call" (I32, I32, I32, I32, I32, I32, I32, I32, I32, I32) -> (I32) [ALL];
    GrpcCall = "env" "proxy_grpc_call" (I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32) -> (I32) [ALL];
    GrpcStream = "env" "proxy_grpc_stream" (I32, I32, I32, I32, I32, I32, I32, I32, I32) -> (I32) [ALL];
    GrpcSend = "env" "proxy_grpc_send" (I32, I32, I32, I32) -> (I32) [ALL];
    GrpcCancel = "env" "proxy_grpc_cancel" (I32) -> (I32) [ALL];
    GrpcClose = "env" "proxy_grpc_close" (I32) -> (I32) [ALL];
    SetSharedData = "env" "proxy_set_shared_data" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    GetSharedData = "env" "proxy_get_shared_data" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    RegisterSharedQueue = "env" "proxy_register_shared_queue" (I32, I32, I32) -> (I32) [ALL];
    ResolveSharedQueue = "env" "proxy_resolve_shared_queue" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    EnqueueSharedQueue = "env" "proxy_enqueue_shared_queue" (I32, I32, I32) -> (I32) [ALL];
    DequeueSharedQueue = "env" "proxy_dequeue_shared_queue" (I32, I32, I32) -> (I32) [ALL];
    DefineMetric = "env" "proxy_define_metric" (I32, I32, I32, I32) -> (I32) [ALL];
    RecordMetric = "env" "proxy_record_metric" (I32, I64) -> (I32) [ALL];
    IncrementMetric = "env" "proxy_increment_metric" (I32, I64) -> (I32) [ALL];
    GetMetric = "env" "proxy_get_metric" (I32, I32) -> (I32) [ALL];
    SetEffectiveContext = "env" "proxy_set_effective_context" (I32) -> (I32) [ALL];
    Done = "env" "proxy_done" () -> (I32) [ALL];
    CallForeignFunction = "env" "proxy_call_foreign_function" (I32, I32, I32, I32, I32, I32) -> (I32) [ALL];
    EmscriptenNotifyMemoryGrowth = "env" "emscripten_notify_memory_growth" (I32) -> () [ALL];
    PthreadEqual = "env" "pthread_equal" (I32, I32) -> (I32) [ALL];
    FdWrite = "wasi" "fd_write" (I32, I32, I32, I32) -> (I32) [ALL];
    FdPwrite = "wasi" "fd_pwrite" (I32, I32, I32, I64, I32) -> (I32) [ALL];
    FdRead = "wasi" "fd_read" (I32, I32, I32, I32) -> (I32) [ALL];
    FdPread = "wasi" "fd_pread" (I32, I32, I32, I64, I32) -> (I32) [ALL];
    FdClose = "wasi" "fd_close" (I32) -> (I32) [ALL];
    FdSeek = "wasi" "fd_seek" (I32, I64, I32, I32) -> (I32) [ALL];
    FdTell = "wasi" "fd_tell" (I32, I32) -> (I32) [ALL];
    FdSync = "wasi" "fd_sync" (I32) -> (I32) [ALL];
    FdDatasync = "wasi" "fd_datasync" (I32) -> (I32) [ALL];
    FdFdstatGet = "wasi" "fd_fdstat_get" (I32, I32) -> (I32) [ALL];
    FdFdstatSetFlags = "wasi" "fd_fdstat_set_flags" (I32, I32) -> (I32) [ALL];
    FdFilestatGet = "wasi" "fd_filestat_get" (I32, I32) -> (I32) [ALL];
    FdPrestatGet = "wasi" "fd_prestat_get" (I32, I32) -> (I32) [ALL];
    FdPrestatDirName = "wasi" "fd_prestat_dir_name" (I32, I32, I32) -> (I32) [ALL];
    FdReaddir = "wasi" "fd_readdir" (I32, I32, I32, I64, I32) -> (I32) [ALL];
    FdRenumber = "wasi" "fd_renumber" (I32, I32) -> (I32) [ALL];
    PathOpen = "wasi" "path_open" (I32, I32, I32, I32, I32, I64, I64, I32, I32) -> (I32) [ALL];
    PathFilestatGet = "wasi" "path_filestat_get" (I32, I32, I32, I32, I32) -> (I32) [ALL];
    EnvironGet = "wasi" "environ_get" (I32, I32) -> (I32) [ALL];
    EnvironSizesGet = "wasi" "environ_sizes_get" (I32, I32) -> (I32) [ALL];
    ArgsGet = "wasi" "args_get" (I32, I32) -> (I32) [ALL];
    ArgsSizesGet = "wasi" "args_sizes_get" (I32, I32) -> (I32) [ALL];
    ClockTimeGet = "wasi" "clock_time_get" (I32, I64, I32) -> (I32) [ALL];
    ClockResGet = "wasi" "clock_res_get" (I32, I32) -> (I32) [ALL];
    RandomGet = "wasi" "random_get" (I32, I32) -> (I32) [ALL];
    ProcExit = "wasi" "proc_exit" (I32) -> () [ALL];
    SchedYield = "wasi" "sched_yield" () -> (I32) [ALL];
    PollOneoff = "wasi" "poll_oneoff" (I32, I32, I32, I32) -> (I32) [ALL];
}

/// The WASI module names every WASI function is registered under.
pub const WASI_MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// Host functions linked for a module of version `abi`, with dispatch ids
/// equal to `HostFn as u32`.
pub fn host_functions(abi: AbiVersion) -> Vec<HostFunc> {
    let mut out = Vec::new();
    for f in HostFn::ALL {
        let (module, name, params, results, versions) = f.spec();
        if !versions.contains(abi) {
            continue;
        }
        let ty = FuncType::new(params, results);
        if module == "wasi" {
            for m in WASI_MODULES {
                out.push(HostFunc {
                    module: m,
                    name,
                    ty: ty.clone(),
                    id: *f as u32,
                });
            }
        } else {
            out.push(HostFunc {
                module,
                name,
                ty,
                id: *f as u32,
            });
        }
    }
    out
}

/// Host functions a guest allocator may call (cpp-host's allocMemory set):
/// anything else made while the host is copying data into the guest is a
/// restricted call and traps.
pub fn allowed_in_allocator(f: HostFn) -> bool {
    matches!(
        f,
        HostFn::Log | HostFn::FdWrite | HostFn::ClockTimeGet | HostFn::PollOneoff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_specific_functions() {
        let names = |v| {
            host_functions(v)
                .into_iter()
                .map(|h| h.name)
                .collect::<Vec<_>>()
        };
        let v010 = names(AbiVersion::V0_1_0);
        assert!(
            v010.contains(&"proxy_get_configuration") && v010.contains(&"proxy_continue_request")
        );
        assert!(!v010.contains(&"proxy_continue_stream") && !v010.contains(&"proxy_get_log_level"));
        let v020 = names(AbiVersion::V0_2_0);
        assert!(v020.contains(&"proxy_continue_stream") && !v020.contains(&"proxy_get_log_level"));
        let v021 = names(AbiVersion::V0_2_1);
        assert!(
            v021.contains(&"proxy_get_log_level") && !v021.contains(&"proxy_clear_route_cache")
        );
        // Every WASI function is offered under both module names.
        let fd = host_functions(AbiVersion::V0_2_1)
            .into_iter()
            .filter(|h| h.name == "fd_write")
            .count();
        assert_eq!(fd, 2);
    }

    #[test]
    fn ids_match_table() {
        for (i, f) in HostFn::ALL.iter().enumerate() {
            assert_eq!(*f as u32, i as u32);
            assert_eq!(HostFn::from_id(i as u32), Some(*f));
        }
    }
}
