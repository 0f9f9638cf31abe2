//! The filter of the HTTP-lifecycle benchmark: what a small real filter does
//! per request, and nothing more. It reads `:path` and adds `x-path-seen`
//! on the request, reads `:status` and adds `x-status-seen` on the response.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Headers) });
}}

struct Headers;

impl Context for Headers {}

impl HttpContext for Headers {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(path) = self.get_http_request_header(":path") {
            self.add_http_request_header("x-path-seen", &path);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(status) = self.get_http_response_header(":status") {
            self.add_http_response_header("x-status-seen", &status);
        }
        Action::Continue
    }
}
