//! tokio baseline echo server for the tcpframe benchmark.
//!
//! `tokio-echo [ADDRESS]` (default 127.0.0.1:0): frames are a 4-byte
//! little-endian length + payload (tokio-util LengthDelimitedCodec); every
//! frame is echoed back. One current_thread runtime, one task per connection.
//! Replies are buffered while more frames are already decoded and flushed when
//! the read side would block (futures `send_all`), i.e. one write per readable
//! batch, like the other servers. Prints "listening on port N"; SIGINT stops it.

use bytes::BytesMut;
use futures::{SinkExt, TryStreamExt};
use std::io::Write;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

const MAX_FRAME: usize = 8 * 1024 * 1024;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .little_endian()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, codec()).map_ok(BytesMut::freeze);
    let mut writer = FramedWrite::new(w, codec());
    // Errors (peer reset, oversized frame) just end this connection.
    let _ = writer.send_all(&mut reader).await;
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tokio-echo: bind {addr}: {e}");
                std::process::exit(1);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        println!("listening on port {port}");
        let _ = std::io::stdout().flush();
        let accept_loop = async {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve(s));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        eprintln!("tokio-echo: accept: {e}");
                        tokio::task::yield_now().await;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        };
        tokio::select! {
            _ = accept_loop => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
